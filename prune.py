"""APoZ filter pruning of our ResNet50: scoring, channel selection and weight surgery.

Three independent steps (in the style of Torch-Pruning):

    scores = apoz(network, layer_names, images)                # one streaming pass, all layers
    keep   = {name: select_channels(group_scores[name], ...)}  # per channel group
    smaller = prune_model(network, keep)                       # a new, really smaller ResNet50

Which layers share a channel (producers, consumers) comes from model.channel_groups(); this
module is the only one that slices weights. The result is built by model.build_resnet50 from
the new width spec, so it is an ordinary Keras model that plain `keras.models.load_model` opens.

Any other functional Keras model is pruned the same way from the channel groups that
channel_graph.trace_channel_groups reads off its graph:

    groups  = channel_graph.trace_channel_groups(network)
    smaller = prune_groups(network, groups, keep)              # or prune_model(network, keep, groups)
"""

import math

import numpy as np

import channel_graph
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

    if isinstance(network.input_shape, list):
        raise ValueError(f"APoZ needs a model of one input; {network.name} has {len(network.input_shape)}")
    features = resnet.feature_model(network, layer_names)

    @tf.function(input_signature=[tf.TensorSpec([None, *network.input_shape[1:]], tf.float32)])
    def count(images):
        outputs = features(images, training=False)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        # every axis but the channels: images and, for feature maps, positions
        counts = [tf.reduce_sum(tf.cast(tf.equal(output, 0), tf.int32), axis=list(range(len(output.shape) - 1)))
                  for output in outputs]
        return counts, tf.shape(images)[0]

    return count


def apoz(network, layer_names, images, batch_size=128, verbose=1, count=None):
    """{layer name: per-channel fraction of zero outputs over all positions and images}.

    `images`: the model's input images (for our ResNet50 raw 0-255 pixels), an array or a tf.data
    pipeline of batches; any single-input model and any layer output works. One pass for all
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
        positions = int(np.prod(network.get_layer(name).output.shape[1:-1], dtype=np.int64))  # 1 for (batch, units)
        result[name] = total / float(image_count * positions)
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


def _kept_indices(name, indices, width):
    """`indices` as a sorted int64 array, checked against a group of `width` channels."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(indices) == 0:
        raise EmptyLayerError(f"cannot remove every channel of {name}")
    if len(np.unique(indices)) != len(indices) or indices.min() < 0 or indices.max() >= width:
        raise ValueError(f"channel indices of {name} must be distinct and within 0..{width - 1}")
    return np.sort(indices)


def prune_model(network, keep, groups=None):
    """A new, smaller ResNet50 keeping, for each group named in `keep`, the listed channel indices.

    `keep`: {group name (see model.channel_groups): indices of channels to keep}; groups not
    named keep every channel. Weights are copied, sliced, from `network`. With `groups` (traced
    groups, e.g. `traced_resnet_groups(network)`, or those of any model from
    channel_graph.trace_channel_groups) the surgery is `prune_groups` instead.
    """
    import keras

    if groups is not None:
        return prune_groups(network, groups, keep)
    spec, stem, class_num, input_shape = resnet.describe_model(network)
    groups = {group["name"]: group for group in resnet.channel_groups()}
    output_index, input_index, widths = {}, {}, {}
    for name, indices in keep.items():
        if name not in groups:
            raise ValueError(f"no channel group named {name!r}")
        indices = _kept_indices(name, indices, resnet.group_width(spec, groups[name]))
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


# ---------------------------------------------------------------------------------------------
# Surgery for any functional model, from channel groups traced by channel_graph


def _changed_config(value, how, removed):
    """A layer config entry holding a width, after removing the channel positions `removed`."""
    if how == "width":  # filters / units
        return int(value) - len(removed)
    if how == "last":  # a target shape ending in the channel count
        return tuple(value[:-1]) + (int(value[-1]) - len(removed),)
    if how == "slice":  # a per-channel list (Normalization mean, Rescaling scale, ...)
        return np.delete(np.asarray(value), removed, axis=-1).tolist()
    raise ValueError(f"unknown config change {how!r}")


def prune_groups(network, groups, keep):
    """A new functional model: `network` with only the listed channels of each group named in `keep`.

    `groups`: channel groups of `network` (channel_graph.trace_channel_groups); `keep`: {group
    name: indices (0..width-1) of channels to keep}; groups not named keep every channel. The
    model is cloned from its layers' configs with smaller filters/units (keras.models.clone_model),
    and every layer's weights are copied, sliced along the axes the groups name. Frozen groups
    raise ValueError.
    """
    import keras

    by_name = {group["name"]: group for group in groups}
    layer_names = {layer.name for layer in network.layers}
    removals = {}  # (layer, weight name) -> {axis: [removed positions, ...]}
    config_changes = {}  # layer -> {config key: (how, [removed positions, ...])}
    for name, indices in keep.items():
        group = by_name.get(name)
        if group is None:
            raise ValueError(f"no channel group named {name!r}")
        if group["frozen"]:
            raise ValueError(f"channel group {name} is frozen and cannot be pruned: {'; '.join(group['reasons'])}")
        roles = [entry for role in ("producers", "consumers", "carriers", "activations") for entry in group[role]]
        missing = sorted({entry["layer"] for entry in roles} - layer_names)
        if missing:
            raise ValueError(f"channel group {name} names layers {', '.join(missing)} that {network.name} lacks: "
                             "trace the groups from this model")
        removed = removed_channels(group["width"], _kept_indices(name, indices, group["width"]))
        if len(removed) == 0:
            continue
        for role in ("producers", "consumers", "carriers"):
            for entry in group[role]:
                positions = entry["indices"][removed].reshape(-1)
                for weight, axis in entry["weights"].items():
                    removals.setdefault((entry["layer"], weight), {}).setdefault(axis, []).append(positions)
                for key, how in entry["config"].items():
                    config_changes.setdefault(entry["layer"], {}).setdefault(key, (how, []))[1].append(positions)

    clones = {}

    def clone(layer):
        config = layer.get_config()
        for key, (how, positions) in config_changes.get(layer.name, {}).items():
            config[key] = _changed_config(config[key], how, np.unique(np.concatenate(positions)))
        try:
            copy = layer.__class__.from_config(config)
        except ValueError:
            # A Lambda of a Python lambda is refused by safe-mode deserialization. A layer without
            # weights and unchanged holds nothing the two models could share by accident: reuse it.
            if getattr(layer, "weights", None) or layer.name in config_changes:
                raise
            copy = layer
        clones[layer.name] = copy
        return copy

    def fresh_input(tensor):  # clone_model would name the input layer after its tensor ('keras_tensor')
        return keras.Input(batch_shape=tensor.shape, dtype=tensor.dtype, name=tensor._keras_history.operation.name)

    smaller = keras.models.clone_model(network, input_tensors=keras.tree.map_structure(fresh_input, network.input),
                                       clone_function=clone)
    for layer in network.layers:
        if not layer.weights:
            continue
        values = []
        for weight, value in zip(layer.weights, layer.get_weights()):
            for axis, positions in removals.get((layer.name, weight.name), {}).items():
                value = np.delete(value, np.unique(np.concatenate(positions)), axis=axis)
            values.append(value)
        copy = clones[layer.name]
        copy.set_weights(values)
        if hasattr(copy, "finalize_state"):  # Normalization derives its mean and variance from its weights
            copy.finalize_state()
    return smaller


def traced_resnet_groups(network):
    """model.channel_groups() of our ResNet50 `network`, read off its graph instead of the table.

    The traced group that has exactly a hand-written group's producers (with their BatchNorms),
    consumers and activations, under the hand-written name (with its kind and spec key), so that
    `prune_model(network, keep, traced_resnet_groups(network))` takes the same `keep` as
    `prune_model(network, keep)`. ValueError when the graph and the table disagree.
    """
    traced = channel_graph.trace_channel_groups(network)
    result = []
    for table in resnet.channel_groups():
        wanted = (set(table["producers"]), set(table["consumers"]), set(table["activations"]))
        for group in traced:
            found = ({entry["layer"] for entry in group["producers"] + group["carriers"]},
                     {entry["layer"] for entry in group["consumers"]},
                     {entry["layer"] for entry in group["activations"]})
            if found == wanted and not group["frozen"]:
                result.append(dict(group, name=table["name"], kind=table["kind"], spec_key=table["spec_key"]))
                break
        else:
            raise ValueError(f"the graph of {network.name} has no channel group like {table['name']} of model.channel_groups()")
    return result
