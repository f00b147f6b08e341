"""Inference BatchNorms folded into the convolutions that feed them, for a frozen network.

A teacher in distillation only ever runs in inference, where BatchNorm is a fixed per-channel
affine map: y = gamma * (x - mean) / sqrt(variance + epsilon) + beta. When x is a convolution's
output (and nothing else reads it), the map folds into that convolution's kernel and bias, and the
BatchNorm's own ops disappear. A pruned teacher's odd channel counts take Keras' unfused BatchNorm
path (see fused_batch_norm.fast_channel_count), so folding saves most of its inference cost.
The folded copy is a plain functional Keras model with the same layer names (the BatchNorms
gone), equal to the original up to float rounding.
"""

import numpy as np


def _single_producer(layer):
    """The layer whose output is `layer`'s only input, or None (several inputs, several calls)."""
    if len(layer._inbound_nodes) != 1:
        return None
    tensors = layer._inbound_nodes[0].input_tensors
    if len(tensors) != 1:
        return None
    return tensors[0]._keras_history.operation


def foldable_pairs(network, keep=()):
    """{convolution name: BatchNormalization name} of the pairs `fold_batch_norms` merges: a
    Conv2D or DepthwiseConv2D without activation, channels last and called once, whose output
    only that BatchNorm (last axis, called once) reads. Layers named in `keep` (e.g. a hint layer
    whose output must stay as it is) are left alone."""
    import keras

    readers = {}
    for layer in network.layers:
        for node in layer._inbound_nodes:
            for tensor in node.input_tensors:
                readers.setdefault(id(tensor._keras_history.operation), []).append(layer)
    pairs = {}
    for layer in network.layers:
        if not isinstance(layer, keras.layers.BatchNormalization) or layer.name in keep:
            continue
        producer = _single_producer(layer)
        if (isinstance(producer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)) and producer.name not in keep
                and len(producer._inbound_nodes) == 1 and producer.data_format == "channels_last"
                and producer.activation is keras.activations.linear and layer.axis in (-1, 3)
                and [reader.name for reader in readers.get(id(producer), [])] == [layer.name]):
            pairs[producer.name] = layer.name
    return pairs


def folded_weights(convolution, batch_norm):
    """[kernel, bias] of `convolution` with `batch_norm`'s inference map folded in (float32 maths)."""
    import keras

    gamma, beta, mean, variance = (np.asarray(weight, np.float64) for weight in batch_norm.get_weights())
    scale = gamma / np.sqrt(variance + batch_norm.epsilon)
    weights = convolution.get_weights()
    kernel = np.asarray(weights[0], np.float64)
    bias = np.asarray(weights[1], np.float64) if convolution.use_bias else np.zeros_like(mean)
    if isinstance(convolution, keras.layers.DepthwiseConv2D):
        # (h, w, input channels, multiplier): output channel c * multiplier + m
        kernel = kernel * scale.reshape(kernel.shape[2], kernel.shape[3])
    else:
        kernel = kernel * scale  # output channels last
    return [kernel.astype(np.float32), (bias * scale + beta - mean * scale).astype(np.float32)]


def fold_batch_norms(network, keep=()):
    """(a copy of `network` for inference with every foldable BatchNorm merged into its
    convolution, the number folded). `network` is unchanged; with nothing to fold, returns it."""
    import keras

    pairs = foldable_pairs(network, keep)
    if not pairs:
        return network, 0
    folded_norms = set(pairs.values())

    def clone(layer):
        config = layer.get_config()
        if layer.name in pairs:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    def call(layer, *args, **kwargs):
        return args[0] if layer.name in folded_norms else layer(*args, **kwargs)

    # New inputs under the old input layers' names: every layer name stays as it was.
    inputs = [keras.Input(batch_shape=tensor.shape, dtype=tensor.dtype, name=tensor._keras_history.operation.name)
              for tensor in network.inputs]
    copy = keras.models.clone_model(network, input_tensors=inputs if len(inputs) > 1 else inputs[0],
                                    clone_function=clone, call_function=call)
    for layer in network.layers:
        if layer.name in folded_norms or not layer.weights:
            continue
        target = copy.get_layer(layer.name)
        if layer.name in pairs:
            target.set_weights(folded_weights(layer, network.get_layer(pairs[layer.name])))
        else:
            target.set_weights(layer.get_weights())
    return copy, len(pairs)
