"""Filter pruning: channel selection and weight surgery, for our ResNet50 and any functional model.

Three independent steps (in the style of Torch-Pruning), the scoring in channel_importance.py:

    groups = traced_resnet_groups(network)                                      # or channel_graph.trace_channel_groups
    scores = channel_importance.importance_scores("apoz", network, groups, images)  # higher = keep
    keep   = {name: select_channels(scores[name], ...)}                  # per group, or select_global(scores, ...)
    smaller = prune_model(network, keep)                                  # a new, really smaller ResNet50

Selection removes the least important channels. Which layers share a channel (producers,
consumers) comes from model.channel_groups(), or from the graph; this module is the only one
that slices weights. The result is built by
model.build_resnet50 from the new width spec, so it is an ordinary Keras model that plain
`keras.models.load_model` opens.

Any other functional Keras model is pruned the same way from the channel groups that
channel_graph.trace_channel_groups reads off its graph:

    groups  = channel_graph.trace_channel_groups(network)
    smaller = prune_groups(network, groups, keep)              # or prune_model(network, keep, groups)
"""

import math

import numpy as np

from cnn_compression import channel_graph
import model as resnet

CRITERIA = ("std", "fraction")
RANKINGS = ("layer", "global")
# Global ranking never takes a group below this share of its width in the base model (nor below
# --min_channels): one layer whose scores happen to be low must not be pruned to nothing.
GLOBAL_MIN_SHARE = 0.1


# ---------------------------------------------------------------------------------------------
# The groups pruned


def prunable_groups(residual=False):
    """The channel groups of our ResNet50 pruned by default (conv1 and conv2 of every block), plus
    the stage residual streams when `residual` is true (model.channel_groups())."""
    return [group for group in resnet.channel_groups() if group["kind"] == "inner" or residual]


def resnet_groups(network, residual=False):
    """`prunable_groups(residual)` of our ResNet50 `network`, traced off its graph (the form every
    importance criterion and `prune_groups` take), in the table's order and under its names."""
    wanted = {group["name"] for group in prunable_groups(residual)}
    return [group for group in traced_resnet_groups(network) if group["name"] in wanted]


def is_residual(group):
    """A traced group whose channels several layers write (tied through an Add or another merge):
    a residual stream. Pruning one reaches into every branch that writes it."""
    return len(group["producers"]) > 1


def any_model_groups(network, residual=False):
    """The channel groups of any functional `network` that pruning may touch: traced, not frozen,
    wider than one channel; residual streams (see `is_residual`) only when `residual` is true."""
    groups = channel_graph.prunable_groups(channel_graph.trace_channel_groups(network))
    return [group for group in groups if residual or not is_residual(group)]


# ---------------------------------------------------------------------------------------------
# Selection: every rule takes importances (higher = keep) and removes the least important


class EmptyLayerError(ValueError):
    """A selection rule would remove every channel of a layer."""


def most_important(scores, kept):
    """Sorted indices of the `kept` most important channels (ties: the lower index is kept)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return np.sort(order[:kept])


def _round_up(kept, round_to, width):
    return min(width, -(-kept // round_to) * round_to)


def select_channels(scores, criterion="std", std_k=1.0, fraction=None, min_channels=1, round_to=1, name="layer"):
    """Sorted indices of the channels to KEEP, given one group's per-channel importance.

    std:      remove the channels whose importance is below mean - std_k * std of the group (for
              1 - APoZ: APoZ above mean + std_k * std, the original's rule).
    fraction: remove the round(fraction * width) least important channels.
    Then keep at least `min_channels` (0: no floor), round the kept count up to a multiple of
    `round_to` (never above the width), and keep the most important channels (ties: lower index).
    """
    scores = np.asarray(scores, dtype=np.float64)
    width = len(scores)
    if width == 0:
        raise ValueError(f"{name} has no channels")
    if criterion == "std":
        if std_k < 0:
            raise ValueError(f"std_k must be non-negative, got {std_k}")
        removed = int(np.sum(scores < scores.mean() - std_k * scores.std()))
    elif criterion == "fraction":
        if fraction is None or not 0 < fraction < 1:
            raise ValueError(f"fraction must lie strictly between 0 and 1, got {fraction}")
        removed = int(math.floor(fraction * width + 0.5))
    else:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if min_channels < 0 or round_to < 1:
        raise ValueError("min_channels must be >= 0 and round_to >= 1")
    kept = _round_up(max(width - removed, min(min_channels, width)), round_to, width)
    if kept == 0:
        raise EmptyLayerError(f"pruning would remove all {width} channels of {name}; raise --min_channels or lower --prune_fraction")
    return most_important(scores, kept)


def normalised_scores(scores):
    """{group name: importances divided by the group's mean}, so that channels of different layers
    compare: 1 is an average channel of its layer. (The mean rather than the max: one outlier
    channel would set a whole layer's scale.) A group scoring all zero stays zero."""
    result = {}
    for name, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        mean = values.mean() if len(values) else 0.0
        result[name] = values / mean if mean > 0 else values
    return result


def global_floor(base_width, min_channels=1, min_share=GLOBAL_MIN_SHARE):
    """Fewest channels global ranking leaves a group whose base-model width is `base_width`:
    --min_channels, and never below `min_share` of that width (at least one channel)."""
    return max(1, min_channels, int(math.ceil(min_share * base_width)))


def select_global(scores, criterion="fraction", std_k=1.0, fraction=None, floors=None, round_to=1):
    """{group name: sorted indices to KEEP}, channels compared across groups by `normalised_scores`.

    fraction: remove the round(fraction * all channels) globally least important channels;
    std:      remove the channels whose normalised score is below mean - std_k * std of all channels.
    A channel whose group is at its floor (`floors`: {group name: fewest channels kept}, default 1)
    is passed over and the next least important one goes instead, so the count holds while some
    group can still give. Kept counts are then rounded up to a multiple of `round_to`.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if round_to < 1:
        raise ValueError("round_to must be >= 1")
    names = list(scores)
    normalised = normalised_scores(scores)
    pooled = np.concatenate([normalised[name] for name in names]) if names else np.zeros(0)
    if criterion == "std":
        if std_k < 0:
            raise ValueError(f"std_k must be non-negative, got {std_k}")
        removed = int(np.sum(pooled < pooled.mean() - std_k * pooled.std())) if len(pooled) else 0
    else:
        if fraction is None or not 0 < fraction < 1:
            raise ValueError(f"fraction must lie strictly between 0 and 1, got {fraction}")
        removed = int(math.floor(fraction * len(pooled) + 0.5))
    widths = {name: len(scores[name]) for name in names}
    kept = dict(widths)
    floor = {name: min(widths[name], max(1, (floors or {}).get(name, 1))) for name in names}
    group_of = np.concatenate([np.full(widths[name], position) for position, name in enumerate(names)]) if names else np.zeros(0, int)
    # least important first; ties: earlier group, then lower index
    for entry in np.lexsort((np.arange(len(pooled)), group_of, pooled)):
        if removed == 0:
            break
        name = names[group_of[entry]]
        if kept[name] > floor[name]:
            kept[name] -= 1
            removed -= 1
    return {name: most_important(scores[name], _round_up(kept[name], round_to, widths[name])) for name in names}


def removal_order(scores, keep, ranking="layer"):
    """The channels a selection `keep` removes, one group name per channel, in the order a
    smaller step would remove them.

    layer:  proportionally: the j-th least important of the r channels a group loses comes at
            (j + 0.5) / r, so the first n entries are the selection scaled down by one global
            fraction, to the channel (ties: earlier group);
    global: by normalised score, least important first.
    """
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; choose one of {', '.join(RANKINGS)}")
    normalised = normalised_scores(scores) if ranking == "global" else None
    entries = []
    for position, (name, kept) in enumerate(keep.items()):
        removed = removed_channels(len(scores[name]), kept)
        if ranking == "layer":
            priorities = (np.arange(len(removed)) + 0.5) / max(1, len(removed))
        else:
            priorities = np.sort(normalised[name][removed])
        entries += [(float(priority), position, name) for priority in priorities]
    entries.sort()
    return [name for _, _, name in entries]


def ratio_predictor(measure, base_spec, spec, stem="imagenet", class_num=10, input_shape=(32, 32, 3)):
    """A function {group name: new width} -> base / candidate, from width specs alone (no model built).

    `measure`: "compression_rate" (parameters, model.parameter_count) or "mac_ratio" (multiply-
    accumulates, model.mac_count); `spec`: the current model's widths, that the candidate resizes.
    """
    if measure == "compression_rate":
        def count(widths_spec):
            return resnet.parameter_count(widths_spec, stem, class_num)
    elif measure == "mac_ratio":
        def count(widths_spec):
            return resnet.mac_count(widths_spec, stem, class_num, input_shape)
    else:
        raise ValueError(f"unknown measure {measure!r}; choose compression_rate or mac_ratio")
    base = count(base_spec)
    return lambda widths: base / count(resnet.resize_spec(spec, widths))


def size_counter(network, groups):
    """A function {group name: new width} -> (parameters, MACs) of `network` with those groups
    resized (groups not named keep their width), from the traced `groups` alone: no model built.

    Parameters count every weight (BatchNorm statistics included, as `count_params`); MACs are
    each kernel's elements times its layer's output positions (convolutions, dense layers,
    depthwise and separable convolutions; `model.count_macs` for our ResNet50). A weight axis
    shrinks by each group's removed channels times the positions a channel holds there.
    """
    axes = {}  # (layer, weight name) -> {axis: [(group name, positions per channel), ...]}
    widths = {}
    for group in groups:
        widths[group["name"]] = group["width"]
        for role in ("producers", "consumers", "carriers"):
            for entry in group[role]:
                for weight, axis in entry["weights"].items():
                    axes.setdefault((entry["layer"], weight), {}).setdefault(axis, []).append(
                        (group["name"], entry["indices"].shape[1]))
    terms = []  # (shape, {axis: [(group, positions per channel)]}, MACs per element)
    calls = _kernel_positions(network)
    for layer in network.layers:
        positions = calls.get(layer.name, 0)
        for weight in layer.weights:
            shape = tuple(int(size) for size in weight.shape)
            by_axis = {axis % len(shape): shares for axis, shares in axes.get((layer.name, weight.name), {}).items()}
            macs_per_element = positions if weight.name in ("kernel", "depthwise_kernel", "pointwise_kernel") else 0
            terms.append((shape, by_axis, macs_per_element))

    def count(new_widths):
        unknown = sorted(set(new_widths) - set(widths))
        if unknown:
            raise ValueError(f"no channel group named {', '.join(unknown)}")
        removed = {name: widths[name] - int(new_widths.get(name, widths[name])) for name in widths}
        parameters = macs = 0
        for shape, by_axis, macs_per_element in terms:
            size = 1
            for axis, length in enumerate(shape):
                size *= length - sum(removed[name] * positions for name, positions in by_axis.get(axis, ()))
            parameters += size
            macs += size * macs_per_element
        return parameters, macs

    return count


TRANSPOSED_CONVOLUTIONS = ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")


def _kernel_positions(network):
    """{layer name: positions its kernel is applied at for one image, summed over its calls in
    `network`}: the output positions (channels_last), or for a transposed convolution the input
    positions (each input position is multiplied by the whole kernel once; its output has
    stride^2 times more positions). A layer called twice computes twice."""
    nodes = [node for depth in getattr(network, "_nodes_by_depth", {}).values() for node in depth]
    if not nodes:  # a Sequential keeps no node lists of its own: each layer's one call
        nodes = [layer._inbound_nodes[0] for layer in network.layers if layer._inbound_nodes]
    positions = {}

    def count(tensor):
        return int(np.prod(tensor.shape[1:-1], dtype=np.int64))

    for node in nodes:
        layer = node.operation
        tensors = node.input_tensors if type(layer).__name__ in TRANSPOSED_CONVOLUTIONS else node.output_tensors
        if len(tensors) != 1:  # several inputs or outputs (a merge, a nested model): no kernel positions
            continue
        try:
            positions[layer.name] = positions.get(layer.name, 0) + count(tensors[0])
        except (ValueError, TypeError):  # an undefined spatial size
            continue
    return positions


def model_size(network):
    """(parameters, MACs) of any model, in `size_counter`'s convention."""
    return size_counter(network, [])({})


def select_to_target(scores, keep, predict, target, ranking="layer", round_to=1):
    """(keep, predicted ratio, cut): the selection `keep`, cut down so that it just reaches `target`.

    `predict`: {group name: width} -> ratio (see `ratio_predictor`). If the whole selection stays
    below the target it is returned unchanged (cut False). Otherwise the fewest of its removals, in
    `removal_order`, that reach the target are found by bisection (the ratio only grows with each
    channel removed); the result overshoots the target by at most one channel's share (more with
    `round_to` > 1, whose rounding is kept).
    """
    if target <= 0:
        raise ValueError(f"target must be positive, got {target}")
    widths = {name: len(scores[name]) for name in keep}
    order = removal_order(scores, keep, ranking)

    def kept_widths(count):
        removed = dict.fromkeys(widths, 0)
        for name in order[:count]:
            removed[name] += 1
        return {name: _round_up(widths[name] - removed[name], round_to, widths[name]) for name in widths}

    full = predict(kept_widths(len(order)))
    if full < target:
        return keep, full, False
    low, high = 0, len(order)  # predict(kept_widths(high)) >= target throughout
    while low < high:
        middle = (low + high) // 2
        if predict(kept_widths(middle)) >= target:
            high = middle
        else:
            low = middle + 1
    chosen = kept_widths(low)
    return {name: most_important(scores[name], chosen[name]) for name in keep}, predict(chosen), low < len(order)


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
