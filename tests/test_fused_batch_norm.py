"""The fused BatchNorm path against Keras' own maths, in float32 and bfloat16."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import fused_batch_norm
import model as resnet

TOLERANCE = {"float32": 2e-5, "mixed_bfloat16": 3e-2}


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
        return ([np.asarray(tf.cast(outputs, tf.float32))] + [np.asarray(tf.cast(g, tf.float32)) for g in gradients]
                + [np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)], str(outputs.dtype.name))
    finally:
        keras.mixed_precision.set_global_policy("float32")


class _installed:
    def __enter__(self):
        fused_batch_norm.install()

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("training", [True, False])
def test_fused_path_matches_keras_maths(policy, training):
    images = np.random.default_rng(0).normal(3, 2, (8, 5, 5, 16)).astype("float32")
    expected, expected_dtype = run_layer(policy, False, images, training)
    got, got_dtype = run_layer(policy, True, images, training)
    assert got_dtype == expected_dtype == ("float32" if policy == "float32" else "bfloat16")
    names = ["outputs", "input gradient", "gamma gradient", "beta gradient", "moving mean", "moving variance"]
    for name, want, have in zip(names, expected, got):
        scale = max(1.0, float(np.max(np.abs(want))))
        np.testing.assert_allclose(have, want, atol=TOLERANCE[policy] * scale, rtol=TOLERANCE[policy], err_msg=name)
    if training:  # the moving statistics really moved (else the comparison above proves nothing)
        assert not np.allclose(got[4], run_layer(policy, True, images, False)[0][4])


def traced_training_step_ops(network):
    """Op types of the stage's training step (Keras' train_step under training.compile_classifier),
    traced afresh on one batch."""
    import argparse

    import training

    args = argparse.Namespace(epoch_num=1, learning_rate=0.01, momentum=0.9, weight_decay=5e-4, label_smoothing=0.0,
                              lr_schedule="cosine", warmup_epochs=0, step_epochs=60)
    training.compile_classifier(network, args, steps_per_epoch=1)
    images = tf.zeros((2, 32, 32, 3), tf.float32)
    labels = tf.one_hot([0, 1], 10)
    graph = tf.function(network.train_step).get_concrete_function((images, labels)).graph
    return {operation.type for operation in graph.get_operations()}


def test_a_stage_training_step_runs_the_fused_kernel_and_saves_plain_batch_norm(tmp_path):
    """The step a stage trains with (forward and backward) goes through FusedBatchNormV3, as
    the scripts install it (cli.import_tensorflow, which conftest calls); Keras' own path has none."""
    network = resnet.build_resnet50(resnet.width_spec(0.0625), "cifar")
    operations = traced_training_step_ops(network)
    assert {"FusedBatchNormV3", "FusedBatchNormGradV3"} <= operations
    with fused_batch_norm.keras_batch_norm():
        assert "FusedBatchNormV3" not in traced_training_step_ops(resnet.build_resnet50(resnet.width_spec(0.0625), "cifar"))
    path = str(tmp_path / "m.h5")
    network.save(path)
    loaded = keras.models.load_model(path, compile=False)  # no custom objects
    assert type(loaded.get_layer("conv1_bn")) is keras.layers.BatchNormalization
