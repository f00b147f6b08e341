"""Filter pruning of any functional Keras model: the channel groups pruned, their size, the surgery.

Three independent steps (in the style of Torch-Pruning), the scoring in
cnn_compression/channel_importance.py and the selection in cnn_compression/channel_selection.py:

    groups  = any_model_groups(network, residual=False, ignored_layers=("conv1_conv",))
    scores  = channel_importance.importance_scores("apoz", network, groups, images)   # higher = keep
    keep    = {name: channel_selection.select_channels(scores[name], ...)}          # or select_global
    smaller = prune_groups(network, groups, keep)                      # a new, really smaller model

Which layers share a channel (producers, consumers, carriers) is read off the model's graph by
channel_graph.trace_channel_groups; our ResNet50 is pruned like any other model. This module is the
only one that slices weights; the result is an ordinary Keras model that plain
`keras.models.load_model` opens. `size_counter` predicts parameters and MACs without building it.
"""

import numpy as np

from cnn_compression import channel_graph
from cnn_compression.channel_selection import EmptyLayerError, removed_channels


# ---------------------------------------------------------------------------------------------
# The groups pruned


def is_residual(group):
    """A traced group whose channels several layers write (tied through an Add or another merge):
    a residual stream. Pruning one reaches into every branch that writes it."""
    return len(group["producers"]) > 1


def any_model_groups(network, residual=False, ignored_layers=()):
    """The channel groups of functional `network` that pruning may touch: traced, not frozen, wider
    than one channel; residual streams (see `is_residual`) only when `residual` is true; none whose
    channels an `ignored_layers` layer makes or carries (Torch-Pruning's ignored_layers: that
    layer keeps its filters). Named as `readable_names` says; in model order, the residual streams
    after the other groups (the order of apoz.json, figures and seeded random scores, as before the
    ResNet50 was traced). ValueError for an unknown layer name."""
    ignored = set(ignored_layers)
    unknown = sorted(ignored - {layer.name for layer in network.layers})
    if unknown:
        raise ValueError(f"{network.name} has no layer {', '.join(unknown)} (ignored layers)")
    groups = readable_names(channel_graph.trace_channel_groups(network))
    groups = [group for group in channel_graph.prunable_groups(groups) if (residual or not is_residual(group))
              and not ignored & {entry["layer"] for entry in group["producers"] + group["carriers"]}]
    return sorted(groups, key=is_residual)  # stable: model order within each kind


def readable_names(groups):
    """`groups` renamed after the ReLU-family output that shows their channels, as a reader of
    apoz.json or a figure looks for them: one such layer gives its name (our ResNet50's
    'conv2_block1_1_relu'); several, in a residual stream, what their names share plus
    '_residual' ('conv2_block1_out', 'conv2_block2_out', ... -> 'conv2_residual'), else the first
    one's. A group without one, or whose new name another group would share, keeps its traced name
    (channel_graph)."""
    wanted = {}
    for group in groups:
        layers = list(dict.fromkeys(entry["layer"] for entry in group["activations"]))
        name = layers[0] if len(layers) == 1 else None
        if len(layers) > 1:
            shared = _common_prefix(layers)
            name = f"{shared}_residual" if shared and is_residual(group) else layers[0]
        wanted[group["name"]] = name or group["name"]
    while True:  # a clash falls back to the traced names, which are unique, until none is left
        counts = {}
        for name in wanted.values():
            counts[name] = counts.get(name, 0) + 1
        clashes = [traced for traced, name in wanted.items() if counts[name] > 1 and name != traced]
        if not clashes:
            break
        for traced in clashes:
            wanted[traced] = traced
    return [dict(group, name=wanted[group["name"]]) for group in groups]


def _common_prefix(names):
    """The words ('_'-separated) every one of `names` starts with, '' if none."""
    shared = names[0]
    for name in names[1:]:
        while not name.startswith(shared):
            shared = shared[:-1]
    if not all(len(name) == len(shared) or name[len(shared)] == "_" for name in names):
        shared = shared[:shared.rfind("_") + 1] if "_" in shared else ""
    return shared.rstrip("_")


# ---------------------------------------------------------------------------------------------
# Size: parameters and MACs of a choice of widths, no model built


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


# ---------------------------------------------------------------------------------------------
# Surgery


def _kept_indices(name, indices, width):
    """`indices` as a sorted int64 array, checked against a group of `width` channels."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(indices) == 0:
        raise EmptyLayerError(f"cannot remove every channel of {name}")
    if len(np.unique(indices)) != len(indices) or indices.min() < 0 or indices.max() >= width:
        raise ValueError(f"channel indices of {name} must be distinct and within 0..{width - 1}")
    return np.sort(indices)


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
