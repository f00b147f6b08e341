"""Per-channel importance of channel groups: every pruning criterion behind one interface.

    groups = prune.any_model_groups(network, residual=True)       # any functional model, our ResNet50 included
    scores = importance_scores("apoz", network, groups, images)   # {group name: array (width,)}

Every criterion answers in one convention (Torch-Pruning's): one score per channel of each group,
HIGHER = MORE IMPORTANT; channel_selection.py's rules keep the highest. APoZ ("higher = more often
zero = less useful") enters as 1 - APoZ. A criterion only reads weights or runs the model; it
never selects (channel_selection.py) nor slices (prune.py). Frozen groups get no score, nor do
groups a criterion cannot measure (they are left out of the result): apoz and taylor need a
ReLU-family output of the group, bn_scale a BatchNormalization on it, l1 a convolution or dense
producer.

    apoz      1 - APoZ of the group's ReLU-family outputs (Hu et al. 2016); several outputs (a
              residual stream's blocks): their mean
    l1        L1 norm of each output filter of the producers (Li et al. 2017)
    bn_scale  |gamma| of the BatchNorms on the group (Liu et al. 2017)
    taylor    |activation x gradient of the cross-entropy| per image, averaged (Molchanov et al. 2019)
    random    uniform random, seeded: the baseline every criterion must beat
"""

import numpy as np

IMPORTANCES = ("apoz", "l1", "bn_scale", "taylor", "random")
KERNELS = ("kernel", "pointwise_kernel")  # the weight holding a producer's filters


# ---------------------------------------------------------------------------------------------
# Inputs


def image_batches(images, batch_size):
    """A tf.data pipeline of float32 image batches from an array, or from a dataset of image
    batches or (images, labels) batches."""
    import tensorflow as tf

    if isinstance(images, tf.data.Dataset):
        if isinstance(images.element_spec, tuple):
            images = images.map(lambda x, *rest: x)
        return images.map(lambda x: tf.cast(x, tf.float32))
    images = np.asarray(images)
    dataset = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
    return dataset.map(lambda x: tf.cast(x, tf.float32), num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def labelled_batches(images, labels, batch_size):
    """A tf.data pipeline of (float32 images, int64 labels) batches from arrays, or from a dataset
    of (images, labels) batches whose labels are class indices or one-hot rows."""
    import tensorflow as tf

    def cast(x, y):
        if y.shape.rank == 2:
            y = tf.argmax(y, axis=-1)
        return tf.cast(x, tf.float32), tf.cast(y, tf.int64)

    if isinstance(images, tf.data.Dataset):
        return images.map(cast)
    if labels is None:
        raise ValueError("the gradient of the loss needs the images' labels; pass labels")
    images, labels = np.asarray(images), np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
    return dataset.map(cast, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _single_input_shape(network, what):
    if isinstance(network.input_shape, list):
        raise ValueError(f"{what} needs a model of one input; {network.name} has {len(network.input_shape)}")
    return network.input_shape[1:]


def _stream(dataset, step, totals, verbose, what):
    """Run `step(*batch)` -> (per-output sums, image count) over `dataset`, adding the sums into
    `totals` (float64 or int64 arrays) on the host; returns the image count."""
    import keras

    steps = int(dataset.cardinality())
    progress = keras.utils.Progbar(steps if steps > 0 else None, verbose=verbose, unit_name="batch") if verbose else None
    image_count = 0
    for index, batch in enumerate(dataset):
        sums, size = step(*batch) if isinstance(batch, tuple) else step(batch)
        for total, batch_sum in zip(totals, sums):
            total += batch_sum.numpy()
        image_count += int(size)
        if progress is not None:
            progress.update(index + 1)
    if image_count == 0:
        raise ValueError(f"{what} needs at least one image")
    return image_count


# ---------------------------------------------------------------------------------------------
# APoZ (Hu et al. 2016, "Network Trimming")


def zero_counter(network, layer_names):
    """A compiled function: image batch -> (per-channel zero counts of each named layer, images).

    Only the counts leave the graph, so memory stays that of one batch's forward pass.
    """
    import keras
    import tensorflow as tf

    input_shape = _single_input_shape(network, "APoZ")
    features = keras.Model(network.input, [network.get_layer(name).output for name in layer_names],
                           name=f"{network.name}_features")

    @tf.function(input_signature=[tf.TensorSpec([None, *input_shape], tf.float32)])
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
    layer_names = list(layer_names)
    count = count or zero_counter(network, layer_names)
    totals = [np.zeros(network.get_layer(name).output.shape[-1], np.int64) for name in layer_names]
    image_count = _stream(image_batches(images, batch_size), count, totals, verbose, "APoZ")
    result = {}
    for name, total in zip(layer_names, totals):
        positions = int(np.prod(network.get_layer(name).output.shape[1:-1], dtype=np.int64))  # 1 for (batch, units)
        result[name] = total / float(image_count * positions)
    return result


def _activation_layers(groups):
    return list(dict.fromkeys(entry["layer"] for group in groups for entry in group["activations"]))


def group_apoz(layer_apoz, group):
    """Per-channel APoZ of a group from per-layer APoZ: the mean over the group's outputs (a
    channel read at several positions of one output, as after a Concatenate, averages those)."""
    return np.mean([layer_apoz[entry["layer"]][entry["indices"]].mean(axis=1) for entry in group["activations"]], axis=0)


def apoz_importance(network, groups, images, batch_size=128, verbose=0, measured=None, **unused):
    """{group name: 1 - APoZ}: a channel that is zero more often matters less. `measured`: a dict
    that receives {group name: APoZ} as measured (1 - (1 - APoZ) is not always APoZ in floating point)."""
    groups = [group for group in groups if group["activations"]]
    if not groups:
        return {}
    layer_apoz = apoz(network, _activation_layers(groups), images, batch_size, verbose=verbose)
    result = {}
    for group in groups:
        measured_apoz = group_apoz(layer_apoz, group)
        if measured is not None:
            measured[group["name"]] = measured_apoz
        result[group["name"]] = 1.0 - measured_apoz
    return result


# ---------------------------------------------------------------------------------------------
# Weight magnitudes


def combine_producers(magnitudes):
    """One score per channel from the per-channel magnitudes of a group's several weights.

    One weight (an inner group's conv): its magnitudes as they are. Several (a residual stream,
    written by every conv3 and the shortcut conv of its stage, whose weights live on different
    scales: other fan-ins, other depths): each is divided by its own mean first, so each has an
    equal say, and the results are averaged.
    """
    if len(magnitudes) == 1:
        return np.asarray(magnitudes[0], np.float64)
    normalised = []
    for magnitude in magnitudes:
        magnitude = np.asarray(magnitude, np.float64)
        mean = magnitude.mean()
        normalised.append(magnitude / mean if mean > 0 else magnitude)
    return np.mean(normalised, axis=0)


def _per_channel(layers, entries, weight_names, reduce):
    """For each entry holding one of `weight_names`: reduce(|weight|) over every axis but the
    entry's channel axis, gathered at the entry's positions (summed where a channel has several)."""
    magnitudes = []
    for entry in entries:
        layer = layers[entry["layer"]]
        for weight, value in zip(layer.weights, layer.get_weights()):
            if weight.name not in weight_names or weight.name not in entry["weights"]:
                continue
            axis = entry["weights"][weight.name] % value.ndim
            value = np.abs(value.astype(np.float64))
            per_position = reduce(value, tuple(a for a in range(value.ndim) if a != axis))
            magnitudes.append(per_position[entry["indices"]].sum(axis=1))
    return magnitudes


def l1_importance(network, groups, **unused):
    """{group name: L1 norm of each output filter of the group's producers} (Li et al. 2017,
    "Pruning Filters for Efficient ConvNets"); several producers: see `combine_producers`."""
    layers = {layer.name: layer for layer in network.layers}
    scores = {}
    for group in groups:
        norms = _per_channel(layers, group["producers"], KERNELS, lambda value, axes: value.sum(axis=axes))
        if norms:
            scores[group["name"]] = combine_producers(norms)
    return scores


def bn_scale_importance(network, groups, **unused):
    """{group name: |gamma| of the BatchNorms on the group} (Liu et al. 2017, "Learning Efficient
    Convolutional Networks through Network Slimming"); several BatchNorms: see `combine_producers`."""
    import keras

    layers = {layer.name: layer for layer in network.layers}
    scores = {}
    for group in groups:
        norms = [entry for entry in group["carriers"] if isinstance(layers[entry["layer"]], keras.layers.BatchNormalization)]
        gammas = _per_channel(layers, norms, ("gamma",), lambda value, axes: value)
        if gammas:
            scores[group["name"]] = combine_producers(gammas)
    return scores


# ---------------------------------------------------------------------------------------------
# First-order Taylor (Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning")


def classifier_head(network):
    """(is_probabilities, logits) of `network`'s single output: whether it is a softmax over its
    last axis, and the Keras tensor of the logits before that softmax where the graph has one
    (the input of a final Activation("softmax") or Softmax() layer), else None (the output is
    itself the logits, or a Dense(activation="softmax") computes them inside its layer).

    The one answer every stage and criterion uses (the Taylor loss, the fine-tuning loss), so that
    the three spellings of the same function are scored and trained alike."""
    import keras

    output = network.output
    history = output._keras_history
    layer = history.operation
    # the inputs of the call that made the output (a layer may be called more than once)
    inputs = layer._inbound_nodes[history.node_index].input_tensors
    logits = inputs[0] if inputs else None
    rank = len(output.shape)
    if isinstance(layer, keras.layers.Softmax):
        # a softmax over another axis than the last one is not a classifier's
        axes = {int(axis) % rank for axis in np.atleast_1d(layer.axis)}
        return (True, logits) if axes == {rank - 1} else (False, None)
    activation = getattr(layer, "activation", None)
    # keras.activations.softmax normalises the last axis; compare the function, as the config
    # name of a layer's activation may be a serialized object rather than "softmax"
    if activation is keras.activations.softmax or layer.get_config().get("activation") == "softmax":
        return (True, logits) if isinstance(layer, keras.layers.Activation) else (True, None)
    return False, None


def ends_in_softmax(network):
    """True when `network` outputs probabilities (a final softmax), False for logits."""
    return classifier_head(network)[0]


def _loss_input(network):
    """(tensor, is_probabilities): the logits before a final softmax where the graph has them,
    else the model's output and whether it is a probability (see `classifier_head`)."""
    probabilities, logits = classifier_head(network)
    if logits is not None:
        return logits, False
    return network.output, probabilities


def taylor_accumulator(network, groups):
    """A compiled function: (image batch, labels) -> ([per group, per channel: sum over the batch's
    images of |sum over positions of activation x gradient|], image count).

    The gradient is that of the summed cross-entropy (in float32) with respect to the group's
    ReLU-family outputs, in inference mode: each image's gradient is then that of its own loss.
    Zeroing a channel in every output of its group (a residual stream: every block output of its
    stage) is the same as removing it, so the products are summed over those outputs before
    taking the absolute value: the first-order change of the loss when the whole channel goes.
    """
    import keras
    import tensorflow as tf

    input_shape = _single_input_shape(network, "The Taylor criterion")
    names = _activation_layers(groups)
    index = {name: position for position, name in enumerate(names)}
    loss_input, is_probabilities = _loss_input(network)
    features = keras.Model(network.input, [network.get_layer(name).output for name in names] + [loss_input],
                           name=f"{network.name}_taylor")
    gathers = [[(index[entry["layer"]], tf.constant(entry["indices"], tf.int32)) for entry in group["activations"]]
               for group in groups]

    @tf.function(input_signature=[tf.TensorSpec([None, *input_shape], tf.float32), tf.TensorSpec([None], tf.int64)])
    def accumulate(images, labels):
        with tf.GradientTape() as tape:
            *activations, output = features(images, training=False)
            probabilities = is_probabilities
            if probabilities and output.op.type == "Softmax":  # a Dense(activation="softmax"): its logits, as Keras' loss does
                output, probabilities = output.op.inputs[0], False
            output = tf.cast(output, tf.float32)
            if probabilities:
                picked = tf.gather(output, labels, axis=1, batch_dims=1)
                loss = -tf.reduce_sum(tf.math.log(tf.clip_by_value(picked, 1e-7, 1.0)))
            else:
                loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, output))
        gradients = tape.gradient(loss, activations)
        # (images, channels of the layer): the first-order loss change of zeroing each channel, per image
        contributions = [tf.reduce_sum(tf.cast(a, tf.float32) * tf.cast(g, tf.float32), axis=list(range(1, len(a.shape) - 1)))
                         for a, g in zip(activations, gradients)]
        sums = []
        for gather in gathers:
            # (images, group channels): a channel's positions in each output, all outputs added
            per_channel = tf.add_n([tf.reduce_sum(tf.gather(contributions[position], indices, axis=1), axis=2)
                                    for position, indices in gather])
            sums.append(tf.reduce_sum(tf.abs(per_channel), axis=0))
        return sums, tf.shape(images)[0]

    return accumulate


def taylor_importance(network, groups, images, labels=None, batch_size=128, verbose=0, accumulate=None, **unused):
    """{group name: per-channel first-order Taylor importance}: |sum over positions of activation x
    gradient of the cross-entropy| per image and channel, averaged over the images, in one pass.

    `images`, `labels`: the model's input images and their class indices, or a tf.data pipeline
    of (images, labels) batches. `accumulate`: a `taylor_accumulator(network, groups)` to reuse.
    """
    groups = [group for group in groups if group["activations"]]
    if not groups:
        return {}
    accumulate = accumulate or taylor_accumulator(network, groups)
    totals = [np.zeros(group["width"], np.float64) for group in groups]
    image_count = _stream(labelled_batches(images, labels, batch_size), accumulate, totals, verbose, "The Taylor criterion")
    return {group["name"]: total / image_count for group, total in zip(groups, totals)}


# ---------------------------------------------------------------------------------------------
# The baseline, and the one interface


def random_importance(network, groups, seed=0, **unused):
    """{group name: uniform random scores}. `seed`: an int or a sequence of ints (prune_model.py
    passes (--seed, iteration)); one generator draws the groups in order, so the same seed and
    groups give the same scores."""
    generator = np.random.default_rng(seed)
    return {group["name"]: generator.random(group["width"]) for group in groups}


def scored_groups(name, network, groups):
    """The groups of `groups` that criterion `name` will score (the others keep their channels),
    known without images: not frozen, and for apoz and taylor with a ReLU-family output, for l1
    and bn_scale with the weights they read."""
    if name not in IMPORTANCES:
        raise ValueError(f"unknown importance {name!r}; choose one of {', '.join(IMPORTANCES)}")
    groups = [group for group in groups if not group["frozen"]]
    if name in ("apoz", "taylor"):
        return [group for group in groups if group["activations"]]
    if name in ("l1", "bn_scale"):  # cheap: weights only
        scores = importance_scores(name, network, groups)
        return [group for group in groups if group["name"] in scores]
    return groups


def importance_scores(name, network, groups, images=None, labels=None, batch_size=128, seed=0, verbose=0, measured=None):
    """{group name: per-channel importance of criterion `name`} (see the module docstring) for every
    group that is not frozen and that the criterion can measure; HIGHER = MORE IMPORTANT, always.

    `images` (what the model takes: raw 0-255 pixels for our ResNet50) and, for taylor, `labels`
    (class indices): arrays, or a tf.data pipeline of (images, labels) batches; apoz and taylor
    need them, the others ignore them. `measured`: a dict that receives a criterion's own
    measurement where it is not the importance (apoz: APoZ).
    """
    if name not in IMPORTANCES:
        raise ValueError(f"unknown importance {name!r}; choose one of {', '.join(IMPORTANCES)}")
    if name in ("apoz", "taylor") and images is None:
        raise ValueError(f"the {name} importance is measured on images; pass some")
    groups = [group for group in groups if not group["frozen"]]
    function = {"apoz": apoz_importance, "l1": l1_importance, "bn_scale": bn_scale_importance,
                "taylor": taylor_importance, "random": random_importance}[name]
    return function(network, groups, images=images, labels=labels, batch_size=batch_size, seed=seed,
                    verbose=verbose, measured=measured)
