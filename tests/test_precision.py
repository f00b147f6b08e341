"""--precision: what auto resolves to, float32 files from mixed-precision models, loss scaling
under mixed_float16 (the distiller's own train_step included)."""

import keras
import numpy as np
import pytest

from cnn_compression import checkpoints, cpu
import distillation
import model as resnet
import students
from cnn_compression import training


@pytest.fixture
def policy():
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


def test_auto_follows_the_hardware(monkeypatch):
    """Whatever this host has (AMX here, AVX2 on CI, maybe a GPU): the CPU flags and GPUs are mocked."""
    import tensorflow as tf

    gpus = []
    capability = {}
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: list(gpus) if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda gpu: {"compute_capability": capability[gpu]})
    for flags, expected in (({"avx2", "amx_bf16"}, "mixed_bfloat16"), ({"avx512_bf16"}, "mixed_bfloat16"),
                            ({"avx2", "fma"}, "float32"), (set(), "float32")):
        monkeypatch.setattr(cpu, "flags", lambda flags=flags: flags)
        assert training.resolve_precision("auto") == expected, flags
    # with GPUs, theirs decide (the CPU's AMX aside): all of compute capability 8.0 or more
    monkeypatch.setattr(cpu, "flags", lambda: {"amx_bf16"})
    gpus[:], capability.update({"a100": (8, 0), "t4": (7, 5)})
    gpus[:] = ["a100"]
    assert training.resolve_precision("auto") == "mixed_bfloat16"
    gpus[:] = ["a100", "t4"]
    assert training.resolve_precision("auto") == "float32"
    for explicit in ("float32", "mixed_bfloat16", "mixed_float16"):
        assert training.resolve_precision(explicit) == explicit


def test_set_precision_auto_sets_the_policy_auto_resolves_to(monkeypatch, policy):
    for native, expected in ((True, "mixed_bfloat16"), (False, "float32")):
        monkeypatch.setattr(training, "native_bfloat16", lambda native=native: native)
        assert training.set_precision("auto") == expected
        assert keras.mixed_precision.global_policy().name == expected


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
    # Saved again after training (weights changed): the file holds the new weights, through the
    # float32 clone built at the first save (not rebuilt every epoch).
    clone = checkpoints.float32_copy(network)
    for variable in network.weights:
        variable.assign(variable.numpy() + 0.5)
    policy("mixed_bfloat16")
    checkpoints.save_model(network, path)
    assert checkpoints.float32_copy(network) is clone
    policy("float32")
    for have, want in zip(keras.models.load_model(path, compile=False).get_weights(), network.get_weights()):
        np.testing.assert_array_equal(have, want)
    # ... and a loaded float32 model recast to the mixed policy computes in it, same weights.
    recast = checkpoints.recast(loaded, "mixed_bfloat16")
    assert recast.get_layer("conv1_conv").dtype_policy.name == "mixed_bfloat16"
    assert recast.get_layer("probabilities").dtype_policy.name == "float32"
    assert checkpoints.recast(loaded, "float32") is loaded


STAGE_ARGS = dict(epoch_num=1, learning_rate=0.01, momentum=0.0, weight_decay=0.0, label_smoothing=0.0,
                  lr_schedule="cosine", warmup_epochs=0, step_epochs=60)


def test_a_stage_under_mixed_float16_skips_an_overflowing_step_and_halves_its_loss_scale(policy):
    """training.compile_classifier under mixed_float16: dynamic loss scaling, not just its type. A
    batch that overflows float16 gives infinite gradients: the step is skipped (weights unchanged,
    not NaN) and the scale halves; a normal step then trains at that scale."""
    import argparse

    policy("mixed_float16")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    outputs = keras.layers.Activation("softmax", dtype="float32")(keras.layers.Dense(10)(hidden))
    network = keras.Model(inputs, outputs)
    training.compile_classifier(network, argparse.Namespace(**STAGE_ARGS), steps_per_epoch=1)
    optimizer = network.optimizer
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    initial = float(optimizer.dynamic_scale)
    labels = keras.utils.to_categorical([1, 2], 10)
    before = [weight.copy() for weight in network.get_weights()]
    network.train_on_batch(np.full((2, 4), 1e5, "float32"), labels)  # 1e5 > float16's 65504
    assert float(optimizer.dynamic_scale) == initial / 2
    for have, want in zip(network.get_weights(), before):
        np.testing.assert_array_equal(have, want)
    network.train_on_batch(np.random.default_rng(0).normal(size=(2, 4)).astype("float32"), labels)
    assert float(optimizer.dynamic_scale) == initial / 2
    assert any(not np.array_equal(have, want) for have, want in zip(network.get_weights(), before))


def distiller_step(precision):
    """One Distiller.train_step (all three terms, the discriminator too) from the same float32
    weights under `precision`; returns {variable path: change} of the student's and the
    discriminator's trainable variables, the distiller, and their starting weights."""
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    teacher = resnet.build_resnet50(resnet.width_spec(0.0625), "cifar")
    student = resnet.build_resnet50(students.student_spec(resnet.width_spec(0.0625), [4, 4, 8, 8], stage_widths=[4, 4, 8, 8]),
                                    "cifar", name="student")
    distiller = distillation.Distiller(student, teacher, (0.7, 0.0, 0.2))
    # One step: eagerly, since tracing the pair's train_step would cost more than the step (same maths).
    distiller.compile(optimizer=keras.optimizers.SGD(0.1),
                      discriminator_optimizer=training.scaled_for_precision(keras.optimizers.SGD(0.1)), run_eagerly=True)
    if precision == "mixed_float16":
        # 2^15 (Keras' start) overflows this untrained pair's float16 gradients: that first step would be
        # skipped; at 256 it is taken, and a loss left unscaled or gradients left scaled still show (x256)
        for optimizer in (distiller.optimizer, distiller.discriminator_optimizer):
            optimizer.dynamic_scale.assign(256.0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 32, 32, 3)).astype("float32")
    labels = keras.utils.to_categorical(rng.integers(0, 10, 8), 10)
    variables = student.trainable_variables + distiller.discriminator.trainable_variables
    assert len({variable.path for variable in variables}) == len(variables)
    before = {variable.path: variable.numpy().copy() for variable in variables}
    start = np.concatenate([weight.ravel() for weight in student.get_weights() + distiller.discriminator.get_weights()])
    distiller.train_on_batch(images, labels)
    changes = {variable.path: variable.numpy() - before[variable.path] for variable in variables}
    return changes, distiller, start, [variable.path for variable in distiller.discriminator.trainable_variables]


def test_mixed_float16_distillation_scales_its_losses_and_unscales_its_gradients(policy):
    """The Distiller's own train_step: under mixed_float16 both optimizers scale the loss and
    unscale the gradients before applying them, so one step changes the student and the
    discriminator as the float32 step does: the classifier and the discriminator to a few per cent,
    every variable within float16 noise (its early convolutions' gradients, through 50 float16
    BatchNorms of 8 images, differ by up to ~60%; a missing scale or unscale is a factor of 256)."""
    changes32, _, start32, discriminator = distiller_step("float32")
    changes16, distiller, start16, _ = distiller_step("mixed_float16")
    np.testing.assert_array_equal(start16, start32)  # the same starting point
    assert isinstance(distiller.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(distiller.discriminator_optimizer, keras.optimizers.LossScaleOptimizer)
    assert float(distiller.optimizer.dynamic_scale) == float(distiller.discriminator_optimizer.dynamic_scale) == 256.0  # not skipped
    assert set(changes16) == set(changes32)
    assert discriminator and len(changes32) > 100
    for paths in (["predictions/kernel", "predictions/bias"], discriminator):
        want = np.concatenate([changes32[path].ravel() for path in paths])
        have = np.concatenate([changes16[path].ravel() for path in paths])
        assert np.linalg.norm(want) > 0 and np.linalg.norm(have - want) < 0.1 * np.linalg.norm(want), paths
    for path, want in changes32.items():
        if np.linalg.norm(want) > 1e-3:  # conv biases before a BatchNorm get no gradient (float noise only)
            assert 0.25 < np.linalg.norm(changes16[path]) / np.linalg.norm(want) < 4, path


def test_auto_resumes_a_stored_run_in_the_precision_it_started_in(tmp_path, monkeypatch, policy):
    """A stored run keeps its precision under --precision auto, whatever this machine's hardware:
    a run older than the flag ran in float32 and a bfloat16 run resumes on a CPU without native
    bfloat16. A fresh folder, --overwrite or an explicit value follow the flag as ever."""
    import json

    import train_base_model
    from cnn_compression import stages

    def start(folder, stored_arguments, *flags, native):
        monkeypatch.setattr(training, "native_bfloat16", lambda: native)
        if stored_arguments is not None:
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps({"arguments": stored_arguments, "complete": False}))
        args = train_base_model.parse_args(["--save_folder", str(folder), *flags])
        stages.start_stage(args, args.save_folder)
        assert keras.mixed_precision.global_policy().name == args.precision
        return args.precision

    older = {"epoch_num": 3}  # config.json of a run made before --precision existed
    assert start(tmp_path / "older", older, native=True) == "float32"
    assert start(tmp_path / "bf16", {"precision": "mixed_bfloat16"}, native=False) == "mixed_bfloat16"
    assert start(tmp_path / "fp32", {"precision": "float32"}, native=True) == "float32"
    assert start(tmp_path / "fresh", None, native=True) == "mixed_bfloat16"
    assert start(tmp_path / "overwritten", older, "--overwrite", native=True) == "mixed_bfloat16"
    assert start(tmp_path / "explicit", older, "--precision", "mixed_bfloat16", native=True) == "mixed_bfloat16"
    # what begin_stage will refuse as unreadable leaves auto to the hardware
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert start(tmp_path / "broken", None, native=False) == "float32"
