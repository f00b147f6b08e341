"""The machinery under the stage scripts: channel tracing and importance, the stage start-up and
life cycle, files and checkpoints, data, the training loop, metrics, TensorFlow Lite, figures and
results, the fused BatchNorm, multi-worker set-up (docs/library.md).

Importing the package loads nothing heavy: modules import TensorFlow only when they need it, and
`onednn` must be imported before TensorFlow is (every script does so through `cli`). Call
`setup()` before building or loading models, as every script's main does.
"""


def setup():
    """Set TensorFlow up as every stage script does; call it once, before building models.

    Imports TensorFlow and Keras without their C++ start-up lines (oneDNN chosen first, see
    `onednn`), routes every keras.layers.BatchNormalization through TensorFlow's fused kernel
    (`fused_batch_norm.install`: the same maths, faster, and what makes mixed_bfloat16 pay), and
    computes strided 1x1 convolutions around a oneDNN gradient fault (`strided_pointwise.install`).
    Saved models stay plain Keras. Calling it again does nothing more.
    """
    from cnn_compression import cli
    from cnn_compression import fused_batch_norm
    from cnn_compression import strided_pointwise

    cli.import_tensorflow()
    fused_batch_norm.install()
    strided_pointwise.install()
