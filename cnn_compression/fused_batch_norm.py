"""Keras' BatchNormalization computed by TensorFlow's fused kernel, in float32, bfloat16 and float16.

Keras 3 computes BatchNorm from separate moments and element-wise ops in float32 (it upcasts
bfloat16 inputs); at CIFAR sizes those ops, not the convolutions, dominate a ResNet50 training step,
and they make `mixed_bfloat16` gain nothing. `FusedBatchNormV3` (oneDNN on CPU, cuDNN on GPU) does
the same maths in one kernel on bfloat16 or float16 inputs (statistics in float32). `install()`
swaps only the layer's `call`: the layer, its weights and its saved config stay Keras' own, so
every `.h5` opens with plain `keras.models.load_model`. What the kernel does not cover (masks,
renorm, synchronized, no scale or centre, other ranks or axes, an epsilon below cuDNN's floor)
keeps Keras' path, and so does a channel count the kernel is slow at (`fast_channel_count`).
"""

import contextlib

FUSED_DTYPES = ("float32", "bfloat16", "float16")
CUDNN_MIN_EPSILON = 1.001e-5

# oneDNN's JIT BatchNorm covers channels in whole vector blocks; any other count (a pruned layer's 51,
# a student's 17) falls back to a generic kernel 2-7x slower than the JIT one and no faster than
# Keras' own ops (up to 2-3x slower in one of two runs of benchmarks/batch_norm_widths.py; a pruned
# model's inference 2.4x slower). Multiples of 8 run about as fast as Keras' ops or
# faster on AVX-512 (16 floats a vector) and fill AVX2's 8.
ONEDNN_CHANNEL_BLOCK = 8

_keras_call = None
_slow_odd_channels = None  # set by install(): oneDNN on, no GPU (cuDNN takes any channel count)


def fast_channel_count(channels):
    """Whether the fused kernel is the faster path for this many channels on this machine."""
    return not _slow_odd_channels or channels % ONEDNN_CHANNEL_BLOCK == 0


def _fusable(layer, inputs, mask):
    return (mask is None and not layer.renorm and not getattr(layer, "synchronized", False)
            and layer.scale and layer.center and len(inputs.shape) == 4
            and layer.axis in (-1, 3) and layer.epsilon >= CUDNN_MIN_EPSILON
            and layer.compute_dtype in FUSED_DTYPES and fast_channel_count(inputs.shape[-1]))


def fused_call(self, inputs, training=None, mask=None):
    """BatchNormalization.call through FusedBatchNormV3 (NHWC), same maths as Keras'."""
    import tensorflow as tf

    if not _fusable(self, inputs, mask):
        return _keras_call(self, inputs, training=training, mask=mask)
    inputs = tf.cast(inputs, self.compute_dtype)
    gamma = tf.cast(self.gamma.value, tf.float32)
    beta = tf.cast(self.beta.value, tf.float32)
    if training and self.trainable:
        empty = tf.constant([], tf.float32)
        outputs, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=gamma, offset=beta, mean=empty, variance=empty,
            epsilon=self.epsilon, data_format="NHWC", is_training=True)
        # The kernel normalises with the biased variance but returns the unbiased one; Keras
        # tracks the biased variance in its moving statistics.
        count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:3]), tf.float32)
        variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
        momentum = self.momentum
        self.moving_mean.assign(tf.cast(self.moving_mean.value, tf.float32) * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(tf.cast(self.moving_variance.value, tf.float32) * momentum + variance * (1.0 - momentum))
        return outputs
    outputs, *_ = tf.raw_ops.FusedBatchNormV3(
        x=inputs, scale=gamma, offset=beta,
        mean=tf.cast(self.moving_mean.value, tf.float32), variance=tf.cast(self.moving_variance.value, tf.float32),
        epsilon=self.epsilon, data_format="NHWC", is_training=False)
    return outputs


def install():
    """Route every keras.layers.BatchNormalization through `fused_call` (TensorFlow backend only)."""
    global _keras_call, _slow_odd_channels
    import keras

    layer_class = keras.layers.BatchNormalization
    if keras.backend.backend() != "tensorflow" or layer_class.call is fused_call:
        return
    if _slow_odd_channels is None:
        from cnn_compression import onednn

        _slow_odd_channels = onednn.computes_on_cpu()
    _keras_call = layer_class.call
    layer_class.call = fused_call


def uninstall():
    import keras

    if _keras_call is not None:
        keras.layers.BatchNormalization.call = _keras_call


def installed():
    import keras

    return keras.layers.BatchNormalization.call is fused_call


@contextlib.contextmanager
def keras_batch_norm():
    """Within this block, models traced afresh use Keras' own BatchNorm maths (for tests and benchmarks)."""
    was_installed = installed()
    uninstall()
    try:
        yield
    finally:
        if was_installed:
            install()
