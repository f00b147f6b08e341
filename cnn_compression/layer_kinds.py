"""What the channel trace knows about Keras layer kinds: which pass channels through, which merge
them element-wise, which convolve them, and how to read a layer's activation, data format, width
and weights (`channel_graph` walks the graph with it)."""

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
CONVOLUTIONS = frozenset({"Conv1D", "Conv2D", "Conv3D"})
TRANSPOSED_CONVOLUTIONS = frozenset({"Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"})


class Unfollowable(Exception):
    """The trace cannot say which output channel depends on which input channel of a layer."""


def layer_type(layer):
    """The Keras class name of `layer`; a class of another package (even of the same name) is unknown."""
    kind = type(layer)
    return kind.__name__ if kind.__module__.split(".")[0] == "keras" else f"{kind.__module__}.{kind.__name__}"


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
