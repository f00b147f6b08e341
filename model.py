"""The one ResNet50 definition every stage shares.

The network is built from an explicit *width spec*, so that a pruned or distilled model is the
same ResNet50 with other filter counts:

    {"stem": 64,
     "blocks": [[conv1, conv2], ...],      # one pair per bottleneck block (3+4+6+3 = 16)
     "stages": [256, 512, 1024, 2048]}     # conv3 + shortcut width of each stage (tied by Add)

Layer names follow keras.applications.ResNet50 so that its weights load by name. The spec, stem
and class count can be read back off any saved model (`describe_model`), so a `.h5` opened with
plain `keras.models.load_model` is all a later stage needs.
"""

import copy

from cnn_compression import onednn  # noqa: F401  (before TensorFlow loads)
from cnn_compression.errors import UserError
import keras
import numpy as np

STAGE_BLOCKS = (3, 4, 6, 3)
STAGE_NAMES = ("conv2", "conv3", "conv4", "conv5")
STEMS = ("imagenet", "cifar")
BN_EPSILON = 1.001e-5  # keras.applications' value, so imported weights behave identically
BN_MOMENTUM = 0.9
FULL_STEM_WIDTH = 64
FULL_BLOCK_WIDTHS = (64, 128, 256, 512)  # conv1 = conv2 width of every block of a stage
FULL_STAGE_WIDTHS = (256, 512, 1024, 2048)

# Per-channel statistics of the CIFAR-10 training images (0-255 scale). The model normalises its
# own input with them, so callers feed raw pixels.
CIFAR10_MEAN = (125.307, 122.950, 113.865)
CIFAR10_STD = (62.993, 62.089, 66.705)


class NotOurResNetError(UserError, ValueError):
    """A Keras model that is not a ResNet50 built by this module."""


def block_names():
    """Names ('conv2_block1', ...) of the 16 bottleneck blocks, in order."""
    return [
        f"{stage}_block{index + 1}"
        for stage, count in zip(STAGE_NAMES, STAGE_BLOCKS)
        for index in range(count)
    ]


def stage_of_block(block_index):
    """Index of the stage (0-3) that holds block number `block_index` (0-15)."""
    return int(np.searchsorted(np.cumsum(STAGE_BLOCKS), block_index, side="right"))


def stage_output_names():
    """Names of the four stage output feature maps (post-ReLU of each stage's last block)."""
    names = block_names()
    ends = np.cumsum(STAGE_BLOCKS) - 1
    return [f"{names[end]}_out" for end in ends]


def inner_activation_names():
    """Post-ReLU outputs of conv1 and conv2 of every block: the default prunable channels."""
    return [f"{block}_{part}_relu" for block in block_names() for part in (1, 2)]


def full_width_spec():
    blocks = []
    for width, count in zip(FULL_BLOCK_WIDTHS, STAGE_BLOCKS):
        blocks += [[width, width] for _ in range(count)]
    return {"stem": FULL_STEM_WIDTH, "blocks": blocks, "stages": list(FULL_STAGE_WIDTHS)}


def scale_width(width, multiplier):
    return max(1, int(round(width * multiplier)))


def map_widths(spec, function):
    """A copy of `spec` with `function(width)` for every filter count."""
    return {
        "stem": function(spec["stem"]),
        "blocks": [[function(w) for w in pair] for pair in spec["blocks"]],
        "stages": [function(w) for w in spec["stages"]],
    }


def scale_spec(spec, multiplier):
    """Multiply every filter count of `spec` by `multiplier` (at least one filter each)."""
    if not (np.isfinite(multiplier) and multiplier > 0):
        raise ValueError(f"width multiplier must be a positive number, got {multiplier}")
    return map_widths(spec, lambda width: scale_width(width, multiplier))


def width_spec(multiplier=1.0):
    """keras.applications.ResNet50's widths times `multiplier`."""
    return scale_spec(full_width_spec(), multiplier)


def validate_spec(spec):
    try:
        blocks = [[int(w) for w in pair] for pair in spec["blocks"]]
        stages = [int(w) for w in spec["stages"]]
        stem = int(spec["stem"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"malformed width spec: {error}") from None
    if len(blocks) != sum(STAGE_BLOCKS) or any(len(pair) != 2 for pair in blocks):
        raise ValueError(f"a width spec needs {sum(STAGE_BLOCKS)} [conv1, conv2] pairs")
    if len(stages) != len(STAGE_BLOCKS):
        raise ValueError(f"a width spec needs {len(STAGE_BLOCKS)} stage widths")
    if min([stem] + stages + [w for pair in blocks for w in pair]) < 1:
        raise ValueError("every layer of a width spec needs at least one filter")
    return {"stem": stem, "blocks": blocks, "stages": stages}


def _conv_bn(x, filters, kernel_size, strides, name, padding="valid"):
    x = keras.layers.Conv2D(filters, kernel_size, strides=strides, padding=padding, name=f"{name}_conv")(x)
    # Momentum 0.9 (PyTorch's 0.1) rather than Keras' 0.99: the moving statistics must settle
    # within the few hundred steps of a short CPU run or of a fine-tuning round.
    return keras.layers.BatchNormalization(axis=3, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{name}_bn")(x)


def _bottleneck(x, conv1_width, conv2_width, out_width, strides, with_shortcut_conv, name):
    # Stride sits on the 1x1 conv1 and the shortcut, as in keras.applications (ResNet v1).
    if with_shortcut_conv:
        shortcut = _conv_bn(x, out_width, 1, strides, f"{name}_0")
    else:
        shortcut = x
    x = _conv_bn(x, conv1_width, 1, strides, f"{name}_1")
    x = keras.layers.Activation("relu", name=f"{name}_1_relu")(x)
    x = _conv_bn(x, conv2_width, 3, 1, f"{name}_2", padding="same")
    x = keras.layers.Activation("relu", name=f"{name}_2_relu")(x)
    x = _conv_bn(x, out_width, 1, 1, f"{name}_3")
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return keras.layers.Activation("relu", name=f"{name}_out")(x)


def build_resnet50(spec=None, stem="imagenet", class_num=10, input_shape=(32, 32, 3), name="resnet50"):
    """A functional ResNet50 taking raw 0-255 RGB pixels and returning class probabilities.

    `predictions` is the linear classifier (its output is the logits) and `probabilities` the
    softmax after it; every other name is keras.applications.ResNet50's.
    """
    spec = validate_spec(spec if spec is not None else full_width_spec())
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    if class_num < 1:
        raise ValueError(f"class_num must be at least 1, got {class_num}")
    inputs = keras.Input(shape=input_shape, name="input_layer")
    x = keras.layers.Normalization(
        mean=list(CIFAR10_MEAN), variance=[s * s for s in CIFAR10_STD], name="input_normalization"
    )(inputs)
    if stem == "imagenet":
        x = keras.layers.ZeroPadding2D(padding=3, name="conv1_pad")(x)
        x = _conv_bn(x, spec["stem"], 7, 2, "conv1")
        x = keras.layers.Activation("relu", name="conv1_relu")(x)
        x = keras.layers.ZeroPadding2D(padding=1, name="pool1_pad")(x)
        x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    else:
        x = _conv_bn(x, spec["stem"], 3, 1, "conv1", padding="same")
        x = keras.layers.Activation("relu", name="conv1_relu")(x)
    for index, block in enumerate(block_names()):
        stage = stage_of_block(index)
        first_in_stage = block.endswith("_block1")
        strides = 2 if first_in_stage and stage > 0 else 1
        conv1_width, conv2_width = spec["blocks"][index]
        x = _bottleneck(x, conv1_width, conv2_width, spec["stages"][stage], strides, first_in_stage, block)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dense(class_num, name="predictions")(x)
    # float32 softmax whatever the precision policy: the loss needs the probabilities' full precision.
    outputs = keras.layers.Activation("softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def _filters(model, layer_name):
    try:
        layer = model.get_layer(layer_name)
    except ValueError:
        raise NotOurResNetError(f"model {model.name!r} has no layer {layer_name!r}: not a ResNet50 of this project") from None
    filters = layer.get_config().get("filters", layer.get_config().get("units"))
    if filters is None:
        raise NotOurResNetError(f"layer {layer_name!r} of model {model.name!r} has no filter count")
    return int(filters)


def describe_model(model):
    """Read (spec, stem, class_num, input_shape) back off a model built by `build_resnet50`."""
    if not isinstance(model, keras.Model):
        raise NotOurResNetError("not a Keras model")
    names = {layer.name for layer in model.layers}
    required = {"input_normalization", "conv1_conv", "predictions", "probabilities"}
    missing = sorted(required - names)
    if missing:
        raise NotOurResNetError(f"model {model.name!r} lacks layer(s) {', '.join(missing)}: not a ResNet50 of this project")
    stem = "imagenet" if "pool1_pool" in names else "cifar"
    blocks = [[_filters(model, f"{block}_1_conv"), _filters(model, f"{block}_2_conv")] for block in block_names()]
    stages = [_filters(model, f"{stage}_block1_0_conv") for stage in STAGE_NAMES]
    spec = {"stem": _filters(model, "conv1_conv"), "blocks": blocks, "stages": stages}
    input_shape = tuple(int(d) for d in model.input_shape[1:])
    return spec, stem, _filters(model, "predictions"), input_shape


def rebuild_like(model, spec=None):
    """A fresh (randomly initialised) ResNet50 with `model`'s stem, classes and input, and `spec`."""
    own_spec, stem, class_num, input_shape = describe_model(model)
    return build_resnet50(spec if spec is not None else own_spec, stem, class_num, input_shape)


def logits_model(model):
    """The same network returning logits (the classifier's output before softmax)."""
    return keras.Model(model.input, model.get_layer("predictions").output, name=f"{model.name}_logits")


def feature_model(model, layer_names):
    """The same network returning the named layers' outputs (for distillation hints or APoZ)."""
    outputs = [model.get_layer(name).output for name in layer_names]
    return keras.Model(model.input, outputs, name=f"{model.name}_features")


def parameter_count(spec, stem="imagenet", class_num=10):
    """Trainable plus BatchNorm parameters of `build_resnet50(spec, stem, class_num)`, from the spec alone."""
    spec = validate_spec(spec)
    image_channels = 3  # the input Normalization holds constants, not weights
    kernel = 7 if stem == "imagenet" else 3

    def conv_bn(in_width, out_width, size):
        return size * size * in_width * out_width + out_width + 4 * out_width

    total = conv_bn(image_channels, spec["stem"], kernel)
    in_width = spec["stem"]
    for index, (conv1, conv2) in enumerate(spec["blocks"]):
        out_width = spec["stages"][stage_of_block(index)]
        if block_names()[index].endswith("_block1"):
            total += conv_bn(in_width, out_width, 1)
        total += conv_bn(in_width, conv1, 1) + conv_bn(conv1, conv2, 3) + conv_bn(conv2, out_width, 1)
        in_width = out_width
    return total + in_width * class_num + class_num


def count_parameters(model):
    """Parameters as keras.applications counts them (all weights, BatchNorm statistics included)."""
    return int(model.count_params())


def count_macs(model):
    """Multiply-accumulates of one image's forward pass: ({layer name: MACs}, total).

    Convolutions and dense layers only; BatchNorm, ReLU, pooling and adds are conventionally left out.
    """
    per_layer = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, out_channels = layer.output.shape
            kernel_h, kernel_w, in_channels, _ = layer.kernel.shape
            per_layer[layer.name] = int(height * width * kernel_h * kernel_w * in_channels * out_channels)
        elif isinstance(layer, keras.layers.Dense):
            in_units, out_units = layer.kernel.shape
            per_layer[layer.name] = int(in_units * out_units)
    return per_layer, int(sum(per_layer.values()))


def count_activations(model):
    """Output elements of every layer for one image: the memory traffic MACs do not count.

    On a CPU, small convolutions are bound by writing and re-reading these rather than by arithmetic;
    pruning only the inner channels leaves the residual stream (most of them) as wide as before.
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        total += int(np.prod(layer.output.shape[1:]))
    return total


def copy_spec(spec):
    return copy.deepcopy(validate_spec(spec))


def stage_block_names(stage_index):
    """Names of the blocks of stage `stage_index` (0-3), in order."""
    return [name for index, name in enumerate(block_names()) if stage_of_block(index) == stage_index]
