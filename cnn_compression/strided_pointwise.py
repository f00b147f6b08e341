"""Strided 1x1 convolutions whose kernel gradient is computed exactly, not by oneDNN.

On a 2-core AVX2 AMD EPYC (Zen 3), with oneDNN on, TensorFlow 2.21's weight gradient of a 1x1
convolution with stride 2 came out wrong for some shapes: 78-91% relative error with 5 input
channels on 16x16 maps, and a distillation test's student (2 input channels) failed the same way,
while stride 1, 3x3 kernels and oneDNN off were right (docs/speed.md, "A oneDNN gradient fault").
ResNet50 downsamples through such convolutions (the first block of stages 3-5 and its shortcut),
and pruning leaves them any channel count. The weight gradient of a 1x1 convolution with stride s
is one matrix product, `x[:, ::s, ::s]^T dy`, whatever the padding (a 1x1 kernel needs none), so
it is computed as that; the forward pass and the input gradient stay TensorFlow's (checked right).
Only the computation changes: layers, weights and saved files stay Keras' own.
"""

_keras_convolution_op = None


def strided_pointwise_convolution(inputs, kernel, strides):
    """A channels-last 1x1 convolution with `strides`, its kernel gradient as an exact matrix product."""
    import tensorflow as tf

    @tf.custom_gradient
    def convolve(inputs, kernel):
        outputs = tf.nn.conv2d(inputs, kernel, [1, *strides, 1], "VALID")

        def gradient(upstream):
            input_gradient = tf.raw_ops.Conv2DBackpropInput(
                input_sizes=tf.shape(inputs), filter=kernel, out_backprop=upstream, strides=[1, *strides, 1],
                padding="VALID")
            # The samples the kernel saw: a 1x1 max pool with the same strides picks exactly them,
            # through oneDNN's pooling, five times faster here than TensorFlow's strided slice.
            sampled = tf.nn.max_pool2d(inputs, 1, list(strides), "VALID")
            channels, filters = kernel.shape[2], kernel.shape[3]
            kernel_gradient = tf.matmul(tf.reshape(sampled, [-1, channels]), tf.reshape(upstream, [-1, filters]),
                                        transpose_a=True)
            kernel_gradient = tf.reshape(kernel_gradient, [1, 1, channels, filters])
            return input_gradient, kernel_gradient

        return outputs, gradient

    return convolve(tf.convert_to_tensor(inputs), tf.convert_to_tensor(kernel))


def pointwise_convolution_op(self, inputs, kernel):
    """BaseConv.convolution_op, with strided 1x1 2-D convolutions through `strided_pointwise_convolution`."""
    strides = tuple(self.strides)
    if (self.rank != 2 or tuple(kernel.shape[:2]) != (1, 1) or strides == (1, 1)
            or tuple(self.dilation_rate) != (1, 1) or self.data_format != "channels_last" or self.groups != 1):
        return _keras_convolution_op(self, inputs, kernel)
    return strided_pointwise_convolution(inputs, kernel, strides)


def install():
    """Route strided 1x1 convolutions through `pointwise_convolution_op` where oneDNN runs on a CPU."""
    global _keras_convolution_op
    import keras
    from keras.src.layers.convolutional.base_conv import BaseConv

    if keras.backend.backend() != "tensorflow" or BaseConv.convolution_op is pointwise_convolution_op:
        return
    from cnn_compression import onednn

    if not onednn.computes_on_cpu():
        return  # the fault is oneDNN's; other kernels keep Keras' own call
    _keras_convolution_op = BaseConv.convolution_op
    BaseConv.convolution_op = pointwise_convolution_op


def uninstall():
    from keras.src.layers.convolutional.base_conv import BaseConv

    if _keras_convolution_op is not None:
        BaseConv.convolution_op = _keras_convolution_op


def installed():
    from keras.src.layers.convolutional.base_conv import BaseConv

    return BaseConv.convolution_op is pointwise_convolution_op
