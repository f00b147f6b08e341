"""Strided 1x1 convolutions (ResNet50's downsampling) against a numpy reference: forward, input and
weight gradients. With oneDNN on an AVX2 EPYC the weight gradient at 5 input channels was 78-91%
off before `cnn_compression.strided_pointwise`."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import cnn_compression
from cnn_compression import strided_pointwise

cnn_compression.setup()
RNG = np.random.default_rng(0)


@pytest.mark.parametrize("channels", [2, 5, 8, 51])
@pytest.mark.parametrize("size,padding", [(16, "valid"), (15, "same"), (7, "valid")])
def test_strided_pointwise_convolution_matches_numpy(channels, size, padding):
    layer = keras.layers.Conv2D(8, 1, strides=2, padding=padding)
    inputs = tf.constant(RNG.normal(size=(16, size, size, channels)).astype("float32"))
    layer.build(inputs.shape)
    upstream = RNG.normal(size=(16, (size + 1) // 2, (size + 1) // 2, 8)).astype("float32")

    @tf.function
    def run(inputs):  # traced, as fit runs it
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = layer(inputs)
            loss = tf.reduce_sum(outputs * upstream)
        return (outputs,) + tuple(tape.gradient(loss, [inputs, layer.kernel]))

    outputs, input_gradient, kernel_gradient = [np.asarray(t) for t in run(inputs)]
    sampled = np.asarray(inputs)[:, ::2, ::2, :]  # a 1x1 kernel needs no padding, "same" or not
    kernel = np.asarray(layer.kernel)[0, 0]
    np.testing.assert_allclose(outputs, sampled @ kernel + np.asarray(layer.bias), rtol=1e-4, atol=1e-4)
    expected_input_gradient = np.zeros(inputs.shape, "float32")
    expected_input_gradient[:, ::2, ::2, :] = upstream @ kernel.T
    np.testing.assert_allclose(input_gradient, expected_input_gradient, rtol=1e-4, atol=1e-4)
    expected_kernel_gradient = np.einsum("nhwc,nhwo->co", sampled, upstream)
    np.testing.assert_allclose(kernel_gradient[0, 0], expected_kernel_gradient, rtol=1e-4, atol=1e-3)


def test_grouped_strided_pointwise_convolution_keeps_keras_path_and_its_gradient():
    layer = keras.layers.Conv2D(4, 1, strides=2, groups=2)
    inputs = tf.constant(RNG.normal(size=(4, 8, 8, 8)).astype("float32"))
    layer.build(inputs.shape)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(inputs))
    kernel_gradient = np.asarray(tape.gradient(loss, layer.kernel))
    sampled = np.asarray(inputs)[:, ::2, ::2, :]
    # each group of 2 filters sees its own 4 input channels: d loss / d w[c, o] = sum of channel c's samples
    expected = np.stack([sampled[..., :4].sum((0, 1, 2))] * 2 + [sampled[..., 4:].sum((0, 1, 2))] * 2, axis=1)
    np.testing.assert_allclose(kernel_gradient[0, 0], expected, rtol=1e-4, atol=1e-3)


def test_only_strided_pointwise_convolutions_change_path_and_saved_layers_stay_keras(tmp_path):
    if not strided_pointwise.installed():
        pytest.skip("oneDNN is off here: Keras' own convolution runs")
    inputs = keras.Input((9, 9, 3))
    outputs = keras.layers.Conv2D(4, 1, strides=2, name="pointwise")(inputs)
    outputs = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="spatial")(outputs)
    model = keras.Model(inputs, outputs)
    path = str(tmp_path / "model.h5")
    model.save(path)
    strided_pointwise.uninstall()
    try:
        reloaded = keras.models.load_model(path, compile=False)
        images = RNG.normal(size=(4, 9, 9, 3)).astype("float32")
        expected = reloaded.predict(images, verbose=0)
    finally:
        strided_pointwise.install()
    assert [type(layer) for layer in reloaded.layers] == [type(layer) for layer in model.layers]
    np.testing.assert_allclose(model.predict(images, verbose=0), expected, rtol=1e-5, atol=1e-5)
