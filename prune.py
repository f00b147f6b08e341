"""APoZ filter pruning of our ResNet50: scoring, channel selection and weight surgery.

Three independent steps (in the style of Torch-Pruning):

    scores = apoz(network, layer_names, images)                # one streaming pass, all layers
    keep   = {name: select_channels(group_scores[name], ...)}  # per channel group
    smaller = prune_model(network, keep)                       # a new, really smaller ResNet50

Which layers share a channel (producers, consumers) comes from model.channel_groups(); this
module is the only one that slices weights. The result is built by model.build_resnet50 from
the new width spec, so it is an ordinary Keras model that plain `keras.models.load_model` opens.
"""

import math

import numpy as np

import model as resnet

CRITERIA = ("std", "fraction")


# ---------------------------------------------------------------------------------------------
# Scoring: Average Percentage of Zeros (Hu et al. 2016, "Network Trimming")


def prunable_groups(residual=False):
    """The channel groups pruned by default (conv1 and conv2 of every block), plus the stage
    residual streams when `residual` is true."""
    return [group for group in resnet.channel_groups() if group["kind"] == "inner" or residual]


def _image_batches(images, batch_size):
    """A tf.data pipeline of float32 image batches from an array, or from a dataset of
    image batches or (images, labels) batches."""
    import tensorflow as tf

    if isinstance(images, tf.data.Dataset):
        if isinstance(images.element_spec, tuple):
            images = images.map(lambda x, *rest: x)
        return images.map(lambda x: tf.cast(x, tf.float32))
    images = np.asarray(images)
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
    return dataset.map(lambda x: tf.cast(x, tf.float32), num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def zero_counter(network, layer_names):
    """A compiled function: image batch -> (per-channel zero counts of each named layer, images).

    Only the counts leave the graph, so memory stays that of one batch's forward pass.
    """
    import tensorflow as tf

    features = resnet.feature_model(network, layer_names)
    height, width, channels = network.input_shape[1:]

    @tf.function(input_signature=[tf.TensorSpec([None, height, width, channels], tf.float32)])
    def count(images):
        outputs = features(images, training=False)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        counts = [tf.reduce_sum(tf.cast(tf.equal(output, 0), tf.int32), axis=[0, 1, 2]) for output in outputs]
        return counts, tf.shape(images)[0]

    return count


def apoz(network, layer_names, images, batch_size=128, verbose=1, count=None):
    """{layer name: per-channel fraction of zero outputs over all positions and images}.

    `images`: raw 0-255 images (array) or a tf.data pipeline of batches. One pass for all
    layers; the per-batch zero counts are summed on the host in int64. `count`: a
    `zero_counter(network, layer_names)` to reuse (it is traced on first use).
    """
    import keras

    layer_names = list(layer_names)
    count = count or zero_counter(network, layer_names)
    dataset = _image_batches(images, batch_size)
    steps = int(dataset.cardinality())
    progress = keras.utils.Progbar(steps if steps > 0 else None, verbose=verbose, unit_name="batch") if verbose else None
    totals = [np.zeros(network.get_layer(name).output.shape[-1], np.int64) for name in layer_names]
    image_count = 0
    for step, batch in enumerate(dataset):
        counts, size = count(batch)
        for total, batch_count in zip(totals, counts):
            total += batch_count.numpy()
        image_count += int(size)
        if progress is not None:
            progress.update(step + 1)
    if image_count == 0:
        raise ValueError("APoZ needs at least one image")
    result = {}
    for name, total in zip(layer_names, totals):
        _, height, width, _ = network.get_layer(name).output.shape
        result[name] = total / float(image_count * height * width)
    return result


def group_scores(layer_apoz, groups):
    """{group name: per-channel APoZ}; a residual stream averages its blocks' outputs."""
    return {group["name"]: np.mean([layer_apoz[name] for name in group["activations"]], axis=0) for group in groups}


# ---------------------------------------------------------------------------------------------
# Selection


class EmptyLayerError(ValueError):
    """A selection rule would remove every channel of a layer."""


def select_channels(scores, criterion="std", std_k=1.0, fraction=None, min_channels=1, round_to=1, name="layer"):
    """Sorted indices of the channels to KEEP, given one group's per-channel APoZ.

    std:      remove the channels whose APoZ exceeds mean + std_k * std of the group (the original's rule).
    fraction: remove round(fraction * width) channels of highest APoZ.
    Then keep at least `min_channels` (0: no floor), round the kept count up to a multiple of
    `round_to` (never above the width), and keep the lowest-APoZ channels (ties: lower index).
    """
    scores = np.asarray(scores, dtype=np.float64)
    width = len(scores)
    if width == 0:
        raise ValueError(f"{name} has no channels")
    if criterion == "std":
        if std_k < 0:
            raise ValueError(f"std_k must be non-negative, got {std_k}")
        removed = int(np.sum(scores > scores.mean() + std_k * scores.std()))
    elif criterion == "fraction":
        if fraction is None or not 0 < fraction < 1:
            raise ValueError(f"fraction must lie strictly between 0 and 1, got {fraction}")
        removed = int(math.floor(fraction * width + 0.5))
    else:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if min_channels < 0 or round_to < 1:
        raise ValueError("min_channels must be >= 0 and round_to >= 1")
    kept = max(width - removed, min(min_channels, width))
    kept = min(width, -(-kept // round_to) * round_to)
    if kept == 0:
        raise EmptyLayerError(f"pruning would remove all {width} channels of {name}; raise --min_channels or lower --prune_fraction")
    order = np.argsort(scores, kind="stable")  # lowest APoZ first
    return np.sort(order[:kept])


# ---------------------------------------------------------------------------------------------
# Surgery


def _slice(weight, outputs, inputs):
    # Output channels are the last axis of every Conv2D/Dense/BatchNorm weight; input channels
    # the second-to-last axis of a Conv2D (h, w, in, out) or Dense (in, out) kernel.
    if outputs is not None:
        weight = np.take(weight, outputs, axis=-1)
    if inputs is not None and weight.ndim >= 2:
        weight = np.take(weight, inputs, axis=-2)
    return weight


def prune_model(network, keep):
    """A new, smaller ResNet50 keeping, for each group named in `keep`, the listed channel indices.

    `keep`: {group name (see model.channel_groups): indices of channels to keep}; groups not
    named keep every channel. Weights are copied, sliced, from `network`.
    """
    import keras

    spec, stem, class_num, input_shape = resnet.describe_model(network)
    groups = {group["name"]: group for group in resnet.channel_groups()}
    output_index, input_index, widths = {}, {}, {}
    for name, indices in keep.items():
        if name not in groups:
            raise ValueError(f"no channel group named {name!r}")
        width = resnet.group_width(spec, groups[name])
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) == 0:
            raise EmptyLayerError(f"cannot remove every channel of {name}")
        if len(np.unique(indices)) != len(indices) or indices.min() < 0 or indices.max() >= width:
            raise ValueError(f"channel indices of {name} must be distinct and within 0..{width - 1}")
        indices = np.sort(indices)
        widths[name] = len(indices)
        for layer in groups[name]["producers"]:
            output_index[layer] = indices
        for layer in groups[name]["consumers"]:
            input_index[layer] = indices
    sliceable = (keras.layers.Conv2D, keras.layers.Dense, keras.layers.BatchNormalization)
    smaller = resnet.build_resnet50(resnet.resize_spec(spec, widths), stem, class_num, input_shape, name=network.name)
    for layer in network.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        outputs, inputs = output_index.get(layer.name), input_index.get(layer.name)
        if (outputs is not None or inputs is not None) and not isinstance(layer, sliceable):
            raise ValueError(f"cannot slice layer {layer.name} of type {type(layer).__name__}")
        smaller.get_layer(layer.name).set_weights([_slice(weight, outputs, inputs) for weight in weights])
    return smaller


def removed_channels(width, kept):
    """Indices in 0..width-1 that are not in `kept`."""
    return np.setdiff1d(np.arange(width), kept)
