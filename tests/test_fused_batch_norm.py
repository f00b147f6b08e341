"""training.use_fused_batch_norm: the fused kernel computes exactly what Keras' BatchNormalization does."""

import keras
import numpy as np
import tensorflow as tf

import training


def keras_reference(layer, images, training_mode):
    """Keras' own BatchNormalization maths, in numpy."""
    gamma, beta, moving_mean, moving_variance = [np.array(w) for w in layer.get_weights()]
    if training_mode:
        mean, variance = images.mean(axis=(0, 1, 2)), images.var(axis=(0, 1, 2))
        moving_mean = moving_mean * layer.momentum + mean * (1 - layer.momentum)
        moving_variance = moving_variance * layer.momentum + variance * (1 - layer.momentum)
    else:
        mean, variance = moving_mean, moving_variance
    outputs = (images - mean) / np.sqrt(variance + layer.epsilon) * gamma + beta
    return outputs, moving_mean, moving_variance


def test_fused_batch_norm_matches_keras_maths_in_both_modes():
    training.use_fused_batch_norm()
    assert getattr(keras.layers.BatchNormalization.call, "fused", False)
    rng = np.random.default_rng(0)
    images = rng.normal(2.0, 3.0, (6, 5, 5, 4)).astype("float32")
    for training_mode in (True, False):
        layer = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3)
        layer.build(images.shape)
        layer.set_weights([rng.uniform(0.5, 2, 4), rng.normal(0, 1, 4), rng.normal(0, 1, 4), rng.uniform(0.5, 2, 4)])
        expected, expected_mean, expected_variance = keras_reference(layer, images.astype("float64"), training_mode)
        outputs = tf.function(lambda x: layer(x, training=training_mode))(images)
        np.testing.assert_allclose(outputs.numpy(), expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.moving_mean), expected_mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.moving_variance), expected_variance, rtol=1e-4, atol=1e-5)


def test_fused_batch_norm_gradients_match_the_unfused_formula():
    training.use_fused_batch_norm()
    rng = np.random.default_rng(1)
    images = tf.constant(rng.normal(0, 1, (4, 3, 3, 2)).astype("float32"))
    layer = keras.layers.BatchNormalization()
    layer.build(images.shape)
    weights = tf.constant(rng.normal(0, 1, (4, 3, 3, 2)).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(images)
        fused = tf.reduce_sum(layer(images, training=True) * weights)
    fused_gradients = tape.gradient(fused, [images, layer.gamma.value, layer.beta.value])
    with tf.GradientTape() as tape:
        tape.watch(images)
        mean, variance = tf.nn.moments(images, axes=[0, 1, 2])
        plain = tf.reduce_sum(tf.nn.batch_normalization(images, mean, variance, layer.beta.value, layer.gamma.value,
                                                        layer.epsilon) * weights)
    plain_gradients = tape.gradient(plain, [images, layer.gamma.value, layer.beta.value])
    for fused_gradient, plain_gradient in zip(fused_gradients, plain_gradients):
        np.testing.assert_allclose(fused_gradient.numpy(), plain_gradient.numpy(), rtol=1e-4, atol=1e-4)
