"""What the channel trace knows about Keras layer kinds: which pass channels through, which merge
them element-wise, which convolve them, and how to read a layer's activation, data format, width
and weights (`channel_graph` walks the graph with it)."""

import numpy as np

# Activation functions applied per element: they carry channels through unchanged.
ELEMENTWISE_ACTIVATIONS = frozenset({
    "linear", "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "swish",
    "hard_silu", "hard_swish", "sigmoid", "hard_sigmoid", "log_sigmoid", "tanh", "hard_tanh",
    "softplus", "softsign", "exponential", "mish", "sparse_plus", "squareplus", "soft_shrink",
    "hard_shrink", "tanh_shrink", "threshold",
})
# Their outputs are exactly zero for a whole range of inputs: APoZ measures something there.
RELU_FAMILY = frozenset({"relu", "relu6"})

# Layers that pass every channel through unchanged and hold no per-channel state.
PASS_THROUGH = frozenset({
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
    "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Identity", "LeakyReLU", "ELU",
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
    "AveragePooling3D", "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
    "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D", "ZeroPadding1D", "ZeroPadding2D",
    "ZeroPadding3D", "Cropping1D", "Cropping2D", "Cropping3D", "UpSampling1D", "UpSampling2D",
    "UpSampling3D", "RepeatVector",
})
# Layers whose inputs must have equal channels, channel i of each combined with channel i of the others.
ELEMENTWISE_MERGES = frozenset({"Add", "Subtract", "Multiply", "Maximum", "Minimum", "Average"})
# keras.ops calls that combine two operands element by element, broadcasting (`x + 3.0`, `x * gate`,
# MobileNetV3's hard swish): followed as the merges are, a constant operand only if it is the same
# for every channel (see `constant_shapes`).
ELEMENTWISE_OPS = frozenset({"ops.Add", "ops.Subtract", "ops.Multiply", "ops.Divide", "ops.TrueDivide", "ops.Maximum",
                             "ops.Minimum"})
CONVOLUTIONS = frozenset({"Conv1D", "Conv2D", "Conv3D"})
TRANSPOSED_CONVOLUTIONS = frozenset({"Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"})


class Unfollowable(Exception):
    """The trace cannot say which output channel depends on which input channel of a layer."""


def layer_type(layer):
    """The Keras class name of `layer`; 'ops.<name>' for a keras.ops call in the graph (keras.ops.add is
    class Add too, but takes constants and has none of the layer's attributes); a class of another
    package (even of the same name) is unknown."""
    import keras

    kind = type(layer)
    if kind.__module__.split(".")[0] != "keras":
        return f"{kind.__module__}.{kind.__name__}"
    return kind.__name__ if isinstance(layer, keras.layers.Layer) else f"ops.{kind.__name__}"


def constant_shapes(node):
    """Shapes of the operands of a graph node that are not tensors of the graph: the constants an op
    was called with (3.0 -> (), a numpy or Keras array -> its shape). Keyword flags count too."""
    from keras import KerasTensor

    shapes = []

    def visit(value):
        if isinstance(value, KerasTensor):
            return
        if isinstance(value, (list, tuple, dict)) and any(isinstance(leaf, KerasTensor) for leaf in _leaves(value)):
            for item in (value.values() if isinstance(value, dict) else value):  # tensors and constants mixed
                visit(item)
            return
        shape = getattr(value, "shape", None)
        try:
            shapes.append(tuple(shape) if shape is not None else np.shape(value))
        except ValueError:  # a ragged list: no shape to call it by
            shapes.append((None,))

    for value in (*node.arguments.args, *node.arguments.kwargs.values()):
        visit(value)
    return shapes


def _leaves(value):
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def activation_name(layer):
    """The layer's activation as a name ('relu', ...), None without one, '?' when not a plain name."""
    name = layer.get_config().get("activation")
    if name is None:
        return None
    return name if isinstance(name, str) else "?"


def channels_last(layer):
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def channel_width(shape):
    if len(shape) < 2 or shape[-1] is None:
        raise Unfollowable("its channel axis has no fixed size")
    return int(shape[-1])


def weight_names(layer, allowed):
    names = [weight.name for weight in layer.weights]
    unexpected = sorted(set(names) - set(allowed))
    if unexpected or len(set(names)) != len(names):
        # quantised or LoRA-adapted layers keep other weights whose axes we do not know
        raise Unfollowable(f"unexpected weights {', '.join(unexpected) or names}")
    return set(names)
