"""--precision: what auto resolves to, float32 files from mixed-precision models, loss scaling
under mixed_float16 (the distiller's own train_step included)."""

import keras
import numpy as np
import pytest

import checkpoints
import distillation
import model as resnet
import training


@pytest.fixture
def policy():
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


def test_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(training, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert training.resolve_precision("auto") == "mixed_bfloat16"
    monkeypatch.setattr(training, "cpu_flags", lambda: {"avx2", "fma"})
    assert training.resolve_precision("auto") == "float32"
    assert training.resolve_precision("mixed_float16") == "mixed_float16"


def test_a_mixed_precision_model_is_saved_as_float32(tmp_path, policy):
    policy("mixed_bfloat16")
    network = resnet.build_resnet50(resnet.width_spec(0.0625), "cifar")
    assert network.get_layer("conv1_conv").dtype_policy.name == "mixed_bfloat16"
    assert network.get_layer("probabilities").dtype_policy.name == "float32"  # the softmax stays float32
    path = str(tmp_path / "m.h5")
    checkpoints.save_model(network, path)
    policy("float32")
    loaded = keras.models.load_model(path, compile=False)
    assert {layer.dtype_policy.name for layer in loaded.layers} == {"float32"}
    for have, want in zip(loaded.get_weights(), network.get_weights()):
        np.testing.assert_array_equal(have, want)
    # ... and a loaded float32 model recast to the mixed policy computes in it, same weights.
    recast = checkpoints.recast(loaded, "mixed_bfloat16")
    assert recast.get_layer("conv1_conv").dtype_policy.name == "mixed_bfloat16"
    assert recast.get_layer("probabilities").dtype_policy.name == "float32"
    assert checkpoints.recast(loaded, "float32") is loaded


def test_mixed_float16_distillation_scales_its_losses_and_trains(policy):
    policy("mixed_float16")
    teacher = resnet.build_resnet50(resnet.width_spec(0.0625), "cifar")
    student = resnet.build_resnet50(distillation.student_spec(resnet.width_spec(0.0625), [4, 4, 8, 8], stage_widths=[4, 4, 8, 8]),
                                    "cifar", name="student")
    distiller = distillation.Distiller(student, teacher, (0.7, 0.0, 0.2))
    distiller.compile(optimizer=keras.optimizers.SGD(0.01),
                      discriminator_optimizer=training.scaled_for_precision(keras.optimizers.Adam(1e-4)))
    assert isinstance(distiller.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(distiller.discriminator_optimizer, keras.optimizers.LossScaleOptimizer)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 32, 32, 3)).astype("float32")
    labels = keras.utils.to_categorical(rng.integers(0, 10, 8), 10)
    before = [w.copy() for w in student.get_weights()]
    history = distiller.fit(images, labels, batch_size=8, epochs=1, verbose=0)
    assert all(np.isfinite(values[-1]) for values in history.history.values())
    assert any(not np.array_equal(a, b) for a, b in zip(before, student.get_weights()))
