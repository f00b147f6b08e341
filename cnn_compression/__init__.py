"""The machinery under the stage scripts: channel tracing and importance, the stage life cycle,
files and checkpoints, data, the training loop, metrics, the fused BatchNorm, multi-worker set-up.

Importing the package loads nothing heavy: modules import TensorFlow only when they need it, and
`onednn` must be imported before TensorFlow is (every script does so through `cli`).
"""
