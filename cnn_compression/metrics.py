"""Accuracy and loss of a classifier on images: the one measurement every stage, evaluation and
export report."""

import numpy as np

# Keras' clipping of probabilities in categorical cross-entropy, so the loss matches `evaluate`'s.
PROBABILITY_EPSILON = 1e-7


def predict_probabilities(network, images, batch_size=128):
    """Class probabilities of `network` on raw 0-255 `images`, batch by batch (`predict`, not an
    eager call, so memory stays that of one batch).

    A short last batch is padded with black images, whose rows are dropped: Keras traces its
    predict step once per batch shape, so every batch at full size saves a model's second trace
    (about a second for a tiny ResNet50, more for a big one) for at most one batch of extra work.
    Inference treats every image alone, so the padding changes no other row.
    """
    import keras

    from cnn_compression import data

    images = np.asarray(images)
    count = len(images)
    batch_size = max(1, min(batch_size, count))  # padding is for the last batch, never beyond the data
    padding = -count % batch_size
    if padding:
        images = np.concatenate([images, np.zeros((padding, *images.shape[1:]), images.dtype)])
    batches = data.make_dataset(images, np.zeros(len(images), np.int64), batch_size).map(lambda x, y: x)
    return keras.tree.map_structure(lambda rows: rows[:count], network.predict(batches, verbose=0))


def loss_and_accuracy(network, images, labels, batch_size=128):
    """(cross-entropy, accuracy) of `network` on `images` against integer `labels`; (None, None)
    when there are no images."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return None, None
    probabilities = np.asarray(predict_probabilities(network, images, batch_size), np.float64)
    return loss_and_accuracy_of(probabilities, labels)


def loss_and_accuracy_of(probabilities, labels):
    """(cross-entropy, accuracy) of predicted `probabilities` (rows) against integer `labels`."""
    probabilities = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels)
    picked = np.clip(probabilities[np.arange(len(labels)), labels], PROBABILITY_EPSILON, 1 - PROBABILITY_EPSILON)
    return float(-np.mean(np.log(picked))), float(np.mean(np.argmax(probabilities, axis=1) == labels))


def accuracy(network, images, labels, batch_size=128):
    """Top-1 accuracy of `network` on `images` (None when there are none)."""
    return loss_and_accuracy(network, images, labels, batch_size)[1]


def accuracies(network, splits, batch_size=128):
    """{name: top-1 accuracy (None when empty)} of `network` on `splits` ({name: (images, labels)}),
    all in one `predict` pass: splits smaller than a batch (a small run's validation and test
    images) would each trace the model at their own batch shape."""
    names = list(splits)
    counts = [len(splits[name][1]) for name in names]
    if not sum(counts):
        return {name: None for name in names}
    images = np.concatenate([np.asarray(splits[name][0]) for name in names if len(splits[name][1])])
    predicted = np.argmax(predict_probabilities(network, images, batch_size), axis=1)
    result, start = {}, 0
    for name, count in zip(names, counts):
        labels = np.asarray(splits[name][1])
        result[name] = float(np.mean(predicted[start:start + count] == labels)) if count else None
        start += count
    return result
