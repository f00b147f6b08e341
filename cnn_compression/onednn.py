"""TensorFlow's oneDNN kernels on every x86 CPU: import this module before TensorFlow.

TensorFlow turns oneDNN on by default only on CPUs with AVX512-VNNI, AVX512-BF16 or AMX; elsewhere
(the AVX2 CPUs most of our runs see) every convolution runs on Eigen, 1.6x slower at the CIFAR stem
and 8x slower on the original's network (docs/speed.md). The variable is read once, when TensorFlow
loads, so it must be set first; a value the user has set stands.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def enabled():
    """Whether the loaded TensorFlow computes with oneDNN (False also when TensorFlow cannot tell)."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return False
    return bool(_pywrap_util_port.IsMklEnabled())


def computes_on_cpu():
    """Whether the model's kernels will be oneDNN's CPU kernels: oneDNN on and no GPU to take them."""
    if not enabled():
        return False
    import tensorflow as tf

    return not tf.config.list_physical_devices("GPU")
