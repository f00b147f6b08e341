"""The fused BatchNorm path against Keras' own maths, in float32, bfloat16 and float16, and the
cases it leaves to Keras' own path."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from cnn_compression import fused_batch_norm
from cnn_compression import onednn
import model as resnet

TOLERANCE = {"float32": 2e-5, "mixed_bfloat16": 3e-2, "mixed_float16": 4e-3}  # 4e-3: a few float16 ulps
COMPUTE_DTYPE = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}


def run_layer(policy, fused, images, training):
    """Outputs, gradients (inputs, gamma, beta) and moving statistics of one BatchNorm call."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        layer = keras.layers.BatchNormalization(momentum=0.9, epsilon=resnet.BN_EPSILON)
        layer.build(images.shape)
        rng = np.random.default_rng(1)
        layer.set_weights([rng.normal(1, 0.2, images.shape[-1]).astype("float32"),
                           rng.normal(0, 0.2, images.shape[-1]).astype("float32"),
                           rng.normal(0, 0.5, images.shape[-1]).astype("float32"),
                           rng.uniform(0.5, 2, images.shape[-1]).astype("float32")])
        context = fused_batch_norm.keras_batch_norm() if not fused else _installed()
        with context:
            @tf.function
            def step(x):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    outputs = layer(x, training=training)
                    loss = tf.reduce_sum(tf.cast(outputs, tf.float32) * weights)
                return outputs, tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])

            weights = tf.constant(np.random.default_rng(2).normal(size=images.shape), tf.float32)
            outputs, gradients = step(tf.constant(images))
            graph = step.get_concrete_function(tf.constant(images)).graph
        fused_kernel = "FusedBatchNormV3" in {operation.type for operation in graph.get_operations()}
        return ([np.asarray(tf.cast(outputs, tf.float32))] + [np.asarray(tf.cast(g, tf.float32)) for g in gradients]
                + [np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)], (str(outputs.dtype.name), fused_kernel))
    finally:
        keras.mixed_precision.set_global_policy("float32")


class _installed:
    def __enter__(self):
        fused_batch_norm.install()

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize("training", [True, False])
def test_fused_path_matches_keras_maths(policy, training):
    images = np.random.default_rng(0).normal(3, 2, (8, 5, 5, 16)).astype("float32")
    expected, expected_dtype = run_layer(policy, False, images, training)
    got, got_dtype = run_layer(policy, True, images, training)
    assert got_dtype == (COMPUTE_DTYPE[policy], True) and expected_dtype == (COMPUTE_DTYPE[policy], False)  # kernel vs Keras
    names = ["outputs", "input gradient", "gamma gradient", "beta gradient", "moving mean", "moving variance"]
    for name, want, have in zip(names, expected, got):
        scale = max(1.0, float(np.max(np.abs(want))))
        np.testing.assert_allclose(have, want, atol=TOLERANCE[policy] * scale, rtol=TOLERANCE[policy], err_msg=name)
    if training:  # the moving statistics really moved (else the comparison above proves nothing)
        assert not np.allclose(got[4], run_layer(policy, True, images, False)[0][4])


FALLBACKS = {  # BatchNormalization options (and the input) FusedBatchNormV3 does not cover, or runs slowly
    "mask": ({}, (4, 5, 5, 8), True),
    "renorm": ({"renorm": True}, (4, 5, 5, 8), False),
    "no scale": ({"scale": False}, (4, 5, 5, 8), False),
    "no centre": ({"center": False}, (4, 5, 5, 8), False),
    "rank 2": ({}, (8, 8), False),
    "rank 3": ({}, (4, 5, 8), False),
    "axis 1": ({"axis": 1}, (4, 8, 5, 5), False),
    "epsilon 1e-5": ({"epsilon": 1e-5}, (4, 5, 5, 8), False),
    "12 channels, oneDNN on a CPU": ({}, (4, 5, 5, 12), False),  # a pruned width: oneDNN's slow generic kernel
}


@pytest.mark.parametrize("case", list(FALLBACKS))
@pytest.mark.parametrize("training", [True, False])
def test_what_the_fused_kernel_does_not_cover_takes_keras_path_and_numbers(case, training, monkeypatch):
    options, shape, masked = FALLBACKS[case]
    monkeypatch.setattr(fused_batch_norm, "_slow_odd_channels", True)  # as with oneDNN on a CPU, whatever the host
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(3, 2, shape).astype("float32"))
    mask = tf.constant(rng.uniform(size=shape[:-1]) < 0.7) if masked else None
    channels = shape[options.get("axis", -1)]

    def run(fused):
        layer = keras.layers.BatchNormalization(momentum=0.9, **options)
        layer.build(shape)
        for variable, value in zip(layer.non_trainable_weights, (rng_state.normal(0, 0.5, channels), rng_state.uniform(0.5, 2, channels))):
            variable.assign(value.astype("float32"))
        if fused:
            assert not fused_batch_norm._fusable(layer, images, mask)
        context = fused_batch_norm.keras_batch_norm() if not fused else _installed()
        with context:
            step = tf.function(lambda x: layer(x, training=training, mask=mask))
            outputs = step(images)
            operations = {operation.type for operation in step.get_concrete_function(images).graph.get_operations()}
        return np.asarray(outputs), [np.asarray(weight) for weight in layer.weights], operations

    rng_state = np.random.default_rng(1)
    expected, expected_weights, _ = run(False)
    rng_state = np.random.default_rng(1)
    got, got_weights, operations = run(True)
    assert not any(operation.startswith("FusedBatchNorm") for operation in operations)
    np.testing.assert_array_equal(got, expected)  # Keras' own ops: the same numbers, not just close ones
    for have, want in zip(got_weights, expected_weights):
        np.testing.assert_array_equal(have, want)
    assert fused_batch_norm.installed()


def test_the_default_layer_is_fusable_and_the_kernel_runs(monkeypatch):
    """The control for the cases above: one option away from them the kernel does run."""
    monkeypatch.setattr(fused_batch_norm, "_slow_odd_channels", True)
    layer = keras.layers.BatchNormalization(epsilon=fused_batch_norm.CUDNN_MIN_EPSILON)
    images = tf.zeros((2, 3, 3, 8))
    layer.build(images.shape)
    assert fused_batch_norm._fusable(layer, images, None)
    step = tf.function(lambda x: layer(x, training=True))
    assert "FusedBatchNormV3" in {operation.type for operation in step.get_concrete_function(images).graph.get_operations()}


def test_odd_channel_counts_go_to_keras_path_only_where_the_fused_kernel_is_slow_at_them(monkeypatch):
    """oneDNN's JIT BatchNorm takes whole blocks of 8 channels (16 on AVX-512); with oneDNN on a CPU a
    pruned layer's 51 channels take Keras' ops, which beat the kernel's generic fallback. Elsewhere
    (a GPU's cuDNN, oneDNN off) every count stays fused."""
    monkeypatch.setattr(fused_batch_norm, "_slow_odd_channels", True)
    assert [fused_batch_norm.fast_channel_count(c) for c in (8, 16, 24, 51, 64, 102, 104, 205, 410)] == \
        [True, True, True, False, True, False, True, False, False]
    monkeypatch.setattr(fused_batch_norm, "_slow_odd_channels", False)
    assert all(fused_batch_norm.fast_channel_count(c) for c in (8, 51, 205))
    # installed by cnn_compression.setup() (conftest): oneDNN on, no GPU here
    monkeypatch.undo()
    assert fused_batch_norm._slow_odd_channels == onednn.computes_on_cpu()


def traced_training_step_ops(network):
    """Op types of the stage's training step (Keras' train_step under training.compile_classifier),
    traced afresh on one batch."""
    import argparse

    from cnn_compression import training

    args = argparse.Namespace(epoch_num=1, learning_rate=0.01, momentum=0.9, weight_decay=5e-4, label_smoothing=0.0,
                              lr_schedule="cosine", warmup_epochs=0, step_epochs=60)
    training.compile_classifier(network, args, steps_per_epoch=1)
    images = tf.zeros((2, 32, 32, 3), tf.float32)
    labels = tf.one_hot([0, 1], 10)
    graph = tf.function(network.train_step).get_concrete_function((images, labels)).graph
    return {operation.type for operation in graph.get_operations()}


def test_a_stage_training_step_runs_the_fused_kernel_and_saves_plain_batch_norm(tmp_path):
    """The step a stage trains with (forward and backward) goes through FusedBatchNormV3, as
    the scripts install it (cnn_compression.setup(), which conftest calls too); Keras' own path has none."""
    network = resnet.build_resnet50(resnet.width_spec(0.0625), "cifar")
    operations = traced_training_step_ops(network)
    assert {"FusedBatchNormV3", "FusedBatchNormGradV3"} <= operations
    with fused_batch_norm.keras_batch_norm():
        assert "FusedBatchNormV3" not in traced_training_step_ops(resnet.build_resnet50(resnet.width_spec(0.0625), "cifar"))
    path = str(tmp_path / "m.h5")
    network.save(path)
    loaded = keras.models.load_model(path, compile=False)  # no custom objects
    assert type(loaded.get_layer("conv1_bn")) is keras.layers.BatchNormalization


def test_setup_installs_the_fused_path_and_the_quiet_tensorflow_import_alone_does_not():
    """The fused BatchNorm is an explicit set-up call (cnn_compression.setup(), which every script's
    main makes), not a side effect of importing TensorFlow or of parsing flags."""
    import cnn_compression
    from cnn_compression import cli

    with fused_batch_norm.keras_batch_norm():
        cli.import_tensorflow()
        assert not fused_batch_norm.installed()
        cnn_compression.setup()
        assert fused_batch_norm.installed()
    assert fused_batch_norm.installed()
