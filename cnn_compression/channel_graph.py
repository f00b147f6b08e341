"""Channel groups of any functional Keras 3 model, traced from its graph (Torch-Pruning's DepGraph idea).

A channel group is a set of channels that must be removed together: a convolution's output
channels, the BatchNorm entries that normalise them, the input rows of every layer that reads
them, and, through an Add or a Multiply, the channels of every other branch tied to them.

    groups = trace_channel_groups(model)

Every group is a dict:

    name         the first layer (in model order) that creates the channels: a producer, else the
                 model input or an unfollowable layer; '<layer>[start:stop]' when that layer's
                 channels fall into several groups
    width        number of channels; channel i of the group is row i of every `indices` below
    producers    layers whose OUTPUT channels are the group (Conv*, Dense, SeparableConv2D):
                 {"layer", "weights": {weight name: axis}, "config": {key: how}, "indices"}
    consumers    layers whose INPUT channels are the group, same fields (a kernel's input axis)
    carriers     layers that pass the channels through but hold per-channel weights or config
                 (BatchNormalization, DepthwiseConv2D, PReLU, Normalization, Rescaling, Reshape)
    activations  outputs after a ReLU-family function, where APoZ can score the group: {"layer", "indices"}
    frozen       True when the group must not be pruned; `reasons` says why (model input or
                 output, a layer the trace cannot follow, ...)

`indices` is an int array (width, k): the positions of each channel along the named axis of that
layer; k is 1 except where a channel occupies several positions, as in the rows of a Dense after
a Flatten (k = height * width, rows c, c + C, c + 2C, ... in NHWC order) or a channel
concatenated twice. A Concatenate on the channel axis shows as offsets: a group read through it
has positions offset + i. `config` names the layer config entries holding the width: "width"
(filters/units = number of channels), "last" (the last entry of a target shape), "slice"
(a per-channel list). This module only reads the model; prune.prune_groups slices it.

How the graph is walked: `Functional._nodes_by_depth` (the node lists Keras itself runs the
model from, in Function._run_through_graph), from the deepest level to depth 0, so every node's
inputs are seen before it; tensors are identified by `id()`, as Keras does there. Channels are
followed individually: each distinct channel gets an integer id, layers that pass channels
through hand the same ids on, a Concatenate concatenates its inputs' id arrays, a Flatten tiles
them, and Add-like layers merge ids with a union-find.
"""

import numpy as np

from cnn_compression.layer_kinds import (CONVOLUTIONS, ELEMENTWISE_ACTIVATIONS, ELEMENTWISE_MERGES, ELEMENTWISE_OPS,
                                          PASS_THROUGH, RELU_FAMILY, TRANSPOSED_CONVOLUTIONS, Unfollowable,
                                          activation_name, channel_width, channels_last, constant_shapes, layer_type,
                                          weight_names)


class _Channels:
    """Integer channel ids, a union-find over them, and what the trace learnt about each."""

    def __init__(self):
        self.parent = []
        self.entries = []  # dicts: role, layer, ids, weights, config (role-specific)
        self.frozen = []  # (ids, reason)

    def fresh(self, count):
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, channel):
        parent = self.parent
        while parent[channel] != channel:
            parent[channel] = parent[parent[channel]]  # path halving
            channel = parent[channel]
        return channel

    def tie(self, first, second):
        """Channel i of `first` and channel i of `second` are one channel from now on."""
        for a, b in zip(first.tolist(), second.tolist()):
            root_a, root_b = self.find(a), self.find(b)
            if root_a != root_b:
                self.parent[max(root_a, root_b)] = min(root_a, root_b)

    def roots(self):
        """Array mapping every channel id to the id of its union-find class."""
        parent = np.asarray(self.parent, dtype=np.int64)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return parent
            parent = grand

    def record(self, role, layer, ids, **details):
        self.entries.append({"role": role, "layer": layer.name, "ids": ids, **details})

    def freeze(self, ids, reason):
        self.frozen.append((ids, reason))


class _Tracer:
    def __init__(self, model):
        self.model = model
        self.channels = _Channels()
        self.tensors = {}  # id(KerasTensor) -> channel ids along its last axis
        self.slots = {}  # (id(layer), axis name) -> channel ids shared by every call of the layer
        self.calls = {}  # id(layer) -> number of its nodes inside this model

    # -- shared helpers ------------------------------------------------------------------------

    def slot(self, layer, axis, ids):
        """(ids of the layer's `axis`, first call?): a layer called twice shares its weights, so
        the channels of its later calls are tied to those of its first."""
        key = (id(layer), axis)
        if key in self.slots:
            self.channels.tie(self.slots[key], ids)
            return self.slots[key], False
        self.slots[key] = ids
        return ids, True

    def note_activation(self, layer, ids):
        # feature extraction reads layer.output, defined only for a layer called once in the model
        if self.calls.get(id(layer)) == 1:
            self.channels.record("activations", layer, ids)

    # -- layer kinds ---------------------------------------------------------------------------

    def producer(self, layer, inputs, in_shapes, out_shapes):
        kind = layer_type(layer)
        if not channels_last(layer):
            raise Unfollowable("channels_first data format")
        if getattr(layer, "groups", 1) != 1:
            raise Unfollowable(f"grouped convolution (groups={layer.groups})")
        if len(inputs) != 1:
            raise Unfollowable("more than one input")
        activation = activation_name(layer)
        width = channel_width(out_shapes[0])
        if kind == "Dense":
            names = weight_names(layer, {"kernel", "bias"})
            out_weights, in_weights, config = {"kernel": -1, "bias": 0}, {"kernel": -2}, {"units": "width"}
        elif kind in CONVOLUTIONS:
            names = weight_names(layer, {"kernel", "bias"})
            out_weights, in_weights, config = {"kernel": -1, "bias": 0}, {"kernel": -2}, {"filters": "width"}
        elif kind in TRANSPOSED_CONVOLUTIONS:  # kernel (..., out, in)
            names = weight_names(layer, {"kernel", "bias"})
            out_weights, in_weights, config = {"kernel": -2, "bias": 0}, {"kernel": -1}, {"filters": "width"}
        else:  # SeparableConv: depthwise (..., in, multiplier), pointwise (1, 1, in * multiplier, out)
            names = weight_names(layer, {"depthwise_kernel", "pointwise_kernel", "bias"})
            out_weights, config = {"pointwise_kernel": -1, "bias": 0}, {"filters": "width"}
            in_weights = {"depthwise_kernel": -2, "pointwise_kernel": -2}
            if layer.depth_multiplier != 1:
                in_weights = None
        out_weights = {name: axis for name, axis in out_weights.items() if name in names}
        outputs = self.slots.get((id(layer), "out"))
        if outputs is None:  # one set of output channels however often the layer is called
            outputs = self.slots[(id(layer), "out")] = self.channels.fresh(width)
            self.channels.record("producers", layer, outputs, weights=out_weights, config=config)
            if activation is not None and activation not in ELEMENTWISE_ACTIVATIONS:
                # a softmax couples the outputs, not the inputs: only the output channels stay
                self.channels.freeze(outputs, f"made by {layer.name} ({kind}): activation {activation!r} mixes channels")
        if in_weights is None:
            self.channels.freeze(inputs[0], f"read by {layer.name} ({kind}) with depth_multiplier {layer.depth_multiplier}")
        else:
            reads, new = self.slot(layer, "in", inputs[0])
            if new:
                self.channels.record("consumers", layer, reads, weights=in_weights, config={})
        if activation in RELU_FAMILY:
            self.note_activation(layer, outputs)
        return [outputs]

    def carrier(self, layer, inputs, in_shapes, out_shapes):
        """A layer passing channel i to channel i that holds per-channel weights or config."""
        kind = layer_type(layer)
        if len(inputs) != 1:
            raise Unfollowable("more than one input")
        rank = len(in_shapes[0])
        weights, config, relu = {}, {}, False
        if kind == "BatchNormalization":
            axis = layer.axis if isinstance(layer.axis, int) else (layer.axis[0] if len(layer.axis) == 1 else None)
            if axis is None or axis % rank != rank - 1:
                raise Unfollowable(f"normalises axis {layer.axis}, not the channel axis")
            names = weight_names(layer, {"gamma", "beta", "moving_mean", "moving_variance"})
            weights = {name: 0 for name in names}
        elif kind == "DepthwiseConv2D" or kind == "DepthwiseConv1D":
            if not channels_last(layer):
                raise Unfollowable("channels_first data format")
            if layer.depth_multiplier != 1:
                raise Unfollowable(f"depth_multiplier {layer.depth_multiplier}: several outputs per input channel")
            activation = activation_name(layer)
            if activation is not None and activation not in ELEMENTWISE_ACTIVATIONS:
                raise Unfollowable(f"activation {activation!r} mixes channels")
            relu = activation in RELU_FAMILY
            names = weight_names(layer, {"kernel", "bias"})
            weights = {name: (-2 if name == "kernel" else 0) for name in names}  # kernel (..., in, 1)
        elif kind == "PReLU":
            alpha = layer.weights[0]
            if alpha.shape[-1] != 1:  # shared along the channel axis: nothing per channel
                weights = {"alpha": -1}
        elif kind == "Normalization":
            axes = tuple(axis % rank for axis in layer.axis)
            if axes != (rank - 1,):
                raise Unfollowable(f"normalises over axes {layer.axis}, not the channel axis alone")
            names = weight_names(layer, {"mean", "variance", "count"})
            weights = {name: -1 for name in names if name != "count"}
            layer_config = layer.get_config()
            config = {key: "slice" for key in ("mean", "variance")
                      if layer_config.get(key) is not None and np.ndim(layer_config[key]) >= 1
                      and np.shape(layer_config[key])[-1] > 1}
        elif kind == "Rescaling":
            layer_config = layer.get_config()
            config = {key: "slice" for key in ("scale", "offset")
                      if np.ndim(layer_config[key]) >= 1 and np.shape(layer_config[key])[-1] > 1}
        elif kind == "Reshape":
            if in_shapes[0][-1] is None or in_shapes[0][-1] != out_shapes[0][-1]:
                raise Unfollowable("it changes the channel axis")
            # Row-major order: with the last axis unchanged, channel c stays channel c.
            if layer.get_config()["target_shape"][-1] != -1:
                config = {"target_shape": "last"}
        ids, new = self.slot(layer, "channels", inputs[0])
        if new and (weights or config):
            self.channels.record("carriers", layer, ids, weights=weights, config=config)
        if relu:
            self.note_activation(layer, ids)
        return [ids]

    def follow(self, layer, inputs, in_shapes, out_shapes):
        """Output channel ids of one call of `layer`; Unfollowable if the trace cannot tell."""
        kind = layer_type(layer)
        if kind in CONVOLUTIONS or kind in TRANSPOSED_CONVOLUTIONS or kind in ("Dense", "SeparableConv1D", "SeparableConv2D"):
            return self.producer(layer, inputs, in_shapes, out_shapes)
        if kind in ("BatchNormalization", "DepthwiseConv1D", "DepthwiseConv2D", "PReLU", "Normalization",
                    "Rescaling", "Reshape"):
            return self.carrier(layer, inputs, in_shapes, out_shapes)
        if len(out_shapes) != 1:
            raise Unfollowable("more than one output")
        if kind in PASS_THROUGH or kind in ("Activation", "ReLU", "Softmax", "Permute"):
            if len(inputs) != 1:
                raise Unfollowable("more than one input")
            if not channels_last(layer):
                raise Unfollowable("channels_first data format")
            if kind == "Activation":
                activation = activation_name(layer)
                if activation not in ELEMENTWISE_ACTIVATIONS:
                    raise Unfollowable(f"activation {activation!r} mixes channels")
                if activation in RELU_FAMILY:
                    self.note_activation(layer, inputs[0])
            elif kind == "ReLU":
                if layer.negative_slope == 0:
                    self.note_activation(layer, inputs[0])
            elif kind == "Softmax":
                axes = np.atleast_1d(layer.axis) % len(in_shapes[0])
                if len(in_shapes[0]) - 1 in axes:
                    raise Unfollowable("softmax across channels")
            elif kind == "Permute":
                if tuple(layer.dims)[-1] != len(layer.dims):
                    raise Unfollowable("it moves the channel axis")
            elif kind in ("Dropout",) and layer.noise_shape is not None and layer.noise_shape[-1] not in (None, 1):
                raise Unfollowable("its noise shape fixes the channel count")
            return [inputs[0]]
        if kind in ELEMENTWISE_MERGES or kind in ELEMENTWISE_OPS:
            width = channel_width(out_shapes[0])
            # an input of one channel is broadcast over all of them: it is not tied channel by channel
            tied = [ids for ids, shape in zip(inputs, in_shapes) if shape[-1] == width]
            if not tied or any(shape[-1] not in (1, width) for shape in in_shapes):
                raise Unfollowable("inputs of unequal channel counts")
            for ids in tied[1:]:
                self.channels.tie(tied[0], ids)
            return [tied[0]]
        if kind == "Concatenate":
            rank = len(out_shapes[0])
            if layer.axis % rank == rank - 1:
                return [np.concatenate(inputs)]
            if any(len(ids) != len(inputs[0]) for ids in inputs):
                raise Unfollowable("inputs of unequal channel counts")
            for ids in inputs[1:]:
                self.channels.tie(inputs[0], ids)
            return [inputs[0]]
        if kind == "Flatten":
            if not channels_last(layer):
                raise Unfollowable("channels_first data format")
            spatial = in_shapes[0][1:-1]
            if any(size is None for size in spatial):
                raise Unfollowable("its spatial size is not fixed")
            # NHWC flatten order: position s * C + c holds channel c of spatial position s.
            return [np.tile(inputs[0], int(np.prod(spatial, dtype=np.int64)))]
        raise Unfollowable("layer type unknown to the trace")

    # -- the walk ------------------------------------------------------------------------------

    def trace(self):
        model = self.model
        nodes_by_depth = getattr(model, "_nodes_by_depth", None)
        if nodes_by_depth is None:
            raise ValueError(f"model {model.name!r} is not a functional model (no graph to trace)")
        depths = sorted(nodes_by_depth, reverse=True)
        for depth in depths:
            for node in nodes_by_depth[depth]:
                self.calls[id(node.operation)] = self.calls.get(id(node.operation), 0) + 1
        for depth in depths:
            for node in nodes_by_depth[depth]:
                self.visit(node)
        for tensor in model.outputs:
            self.channels.freeze(self.tensors[id(tensor)], "model output")
        return self.channels

    def visit(self, node):
        layer = node.operation
        outputs = list(node.outputs)
        if node.is_input:
            for tensor in outputs:
                width = tensor.shape[-1] if len(tensor.shape) > 1 else None
                ids = self.channels.fresh(width or 0)  # no channel axis of fixed size: nothing to follow
                self.channels.record("origins", layer, ids)
                self.channels.freeze(ids, f"model input {layer.name}")
                self.tensors[id(tensor)] = ids
            return
        inputs = [self.tensors[id(tensor)] for tensor in node.input_tensors]
        in_shapes = [tuple(tensor.shape) for tensor in node.input_tensors]
        out_shapes = [tuple(tensor.shape) for tensor in outputs]
        followed = []
        try:
            if hasattr(layer, "_nodes_by_depth"):
                raise Unfollowable("nested model")
            for shape in constant_shapes(node):
                # x + np.array([...]): one value per channel, which the surgery would have to slice;
                # a scalar (hard swish's 3.0) or a constant broadcast over the channels passes.
                if len(shape) and shape[-1] != 1:
                    raise Unfollowable(f"a constant operand of shape {shape} varies along the channel axis")
            followed = self.follow(layer, inputs, in_shapes, out_shapes)
            if len(followed) != len(out_shapes) or any(len(ids) != channel_width(shape) for ids, shape in zip(followed, out_shapes)):
                raise Unfollowable("its output channels do not match the trace")
            results = followed
        except Unfollowable as why:
            kind = layer_type(layer)
            for ids in inputs + list(followed):  # what a half-followed layer recorded is frozen too
                self.channels.freeze(ids, f"read by {layer.name} ({kind}): {why}")
            results = []
            for shape in out_shapes:
                try:
                    ids = self.channels.fresh(channel_width(shape))
                except Unfollowable:
                    ids = self.channels.fresh(0)
                self.channels.record("origins", layer, ids)
                self.channels.freeze(ids, f"made by {layer.name} ({kind}): {why}")
                results.append(ids)
        for tensor, ids in zip(outputs, results):
            self.tensors[id(tensor)] = ids


def _positions(entry_roots, group_roots):
    """(width, k) positions of each of `group_roots` in an entry, or None if k varies."""
    order = np.argsort(entry_roots, kind="stable")
    ordered = entry_roots[order]
    starts = np.searchsorted(ordered, group_roots, side="left")
    counts = np.searchsorted(ordered, group_roots, side="right") - starts
    if counts.min() != counts.max():
        return None
    return order[starts[:, None] + np.arange(counts[0])]


def trace_channel_groups(model):
    """The channel groups of functional `model` (see the module docstring), in model order."""
    import keras

    if not isinstance(model, keras.Model):
        raise ValueError("trace_channel_groups needs a keras.Model")
    channels = _Tracer(model).trace()
    roots = channels.roots()
    entries = [entry for entry in channels.entries if len(entry["ids"])]
    # Which entries each channel class appears in: classes appearing in the same entries form a group.
    pairs = np.unique(np.concatenate([
        np.stack([roots[entry["ids"]], np.full(len(entry["ids"]), index)], axis=1)
        for index, entry in enumerate(entries)
    ]), axis=0)
    class_ids, starts = np.unique(pairs[:, 0], return_index=True)
    signatures = {}
    for class_id, members in zip(class_ids, np.split(pairs[:, 1], starts[1:])):
        signatures.setdefault(tuple(members.tolist()), []).append(class_id)
    reasons = {}
    for ids, reason in channels.frozen:
        for class_id in np.unique(roots[ids]).tolist():
            reasons.setdefault(class_id, []).append(reason)
    order = {operation.name: index for index, operation in enumerate(model.operations)}

    groups = []
    for signature, members in signatures.items():
        members = np.asarray(members)
        group_entries = [entries[index] for index in signature]
        entry_roots = [roots[entry["ids"]] for entry in group_entries]
        # Channel order of the group: positions in its first origin (else first entry).
        origin_roles = ("producers", "origins")
        reference = next((i for i, entry in enumerate(group_entries) if entry["role"] in origin_roles), 0)
        first_position = _positions(entry_roots[reference], members)
        if first_position is None:
            first_position = np.array([np.flatnonzero(entry_roots[reference] == m)[0] for m in members])[:, None]
        members = members[np.argsort(first_position[:, 0], kind="stable")]
        group = {"name": None, "width": int(len(members)), "producers": [], "consumers": [], "carriers": [],
                 "activations": [], "frozen": False, "reasons": []}
        for class_id in members.tolist():
            for reason in reasons.get(class_id, []):
                if reason not in group["reasons"]:
                    group["reasons"].append(reason)
        origins = []
        for entry, entry_ids in zip(group_entries, entry_roots):
            indices = _positions(entry_ids, members)
            if indices is None:
                group["reasons"].append(f"uneven channel positions in {entry['layer']}")
                continue
            if entry["role"] in origin_roles:
                origins.append((order.get(entry["layer"], len(order)), entry["layer"], indices))
            if entry["role"] == "origins":
                continue
            record = {"layer": entry["layer"], "indices": indices}
            if entry["role"] != "activations":
                record.update(weights=dict(entry["weights"]), config=dict(entry["config"]))
            group[entry["role"]].append(record)
        group["frozen"] = bool(group["reasons"])
        origins.sort(key=lambda origin: origin[0])
        group["_origin"] = origins[0] if origins else (len(order), "channels", first_position)
        groups.append(group)
    _name_groups(groups)
    groups.sort(key=lambda group: (group["_origin"][0], int(group["_origin"][2].min())))
    for group in groups:
        del group["_origin"]
    return groups


def _name_groups(groups):
    by_layer = {}
    for group in groups:
        by_layer.setdefault(group["_origin"][1], []).append(group)
    for layer, members in by_layer.items():
        if len(members) == 1:
            members[0]["name"] = layer
            continue
        for group in members:
            positions = group["_origin"][2]
            group["name"] = f"{layer}[{int(positions.min())}:{int(positions.max()) + 1}]"
    seen = {}
    for group in groups:
        count = seen.get(group["name"], 0)
        seen[group["name"]] = count + 1
        if count:
            group["name"] = f"{group['name']}#{count}"


def frozen_groups(groups):
    """{group name: reasons} of the groups that must not be pruned."""
    return {group["name"]: list(group["reasons"]) for group in groups if group["frozen"]}


def prunable_groups(groups):
    """The groups that may be pruned (not frozen and wider than one channel)."""
    return [group for group in groups if not group["frozen"] and group["width"] > 1]
