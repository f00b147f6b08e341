"""The one measurement every stage reports: probabilities, loss and accuracy against numpy."""

import numpy as np
import pytest

from cnn_compression import metrics


def small_classifier(keras, counter=None):
    """A few-layer classifier; `counter` (a list) gains an item each time Keras traces its call."""

    class CountTraces(keras.layers.Layer):
        def call(self, x):
            if counter is not None:
                counter.append(1)  # Python runs here only when the graph is traced
            return x

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(x)
    x = CountTraces()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("image_count", [200, 256, 5])
def test_probabilities_loss_and_accuracy_match_numpy(image_count):
    import keras

    keras.utils.set_random_seed(0)
    network = small_classifier(keras)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (image_count, 32, 32, 3)).astype(np.uint8)
    labels = rng.integers(0, 10, image_count)

    probabilities = metrics.predict_probabilities(network, images, batch_size=128)
    expected = np.concatenate([keras.ops.convert_to_numpy(network(images[start:start + 64].astype(np.float32)))
                               for start in range(0, image_count, 64)])
    assert probabilities.shape == (image_count, 10)  # the padding's rows are gone
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)

    picked = np.clip(expected.astype(np.float64)[np.arange(image_count), labels], 1e-7, 1 - 1e-7)
    loss, accuracy = metrics.loss_and_accuracy(network, images, labels, batch_size=128)
    assert loss == pytest.approx(-np.mean(np.log(picked)), rel=1e-5)
    assert accuracy == np.mean(np.argmax(expected, axis=1) == labels)


def test_a_short_last_batch_costs_no_second_trace():
    import keras

    traces = []
    network = small_classifier(keras, traces)
    images = np.zeros((200, 32, 32, 3), np.uint8)  # batches of 128 and 72
    before = len(traces)
    metrics.accuracy(network, images, np.zeros(200, np.int64), batch_size=128)
    metrics.accuracy(network, images[:130], np.zeros(130, np.int64), batch_size=128)
    assert len(traces) - before == 1


def test_accuracies_of_several_splits_take_one_trace_and_match_each_split_alone():
    """A small run's validation (200) and test (500) images at batch 256 measured one by one trace
    the model at two batch shapes (200, then 256); together, at one."""
    import keras

    keras.utils.set_random_seed(0)
    traces = []
    network = small_classifier(keras, traces)
    rng = np.random.default_rng(2)
    splits = {name: (rng.integers(0, 256, (count, 32, 32, 3)).astype(np.uint8), rng.integers(0, 10, count))
              for name, count in (("val", 200), ("test", 500), ("none", 0))}
    before = len(traces)
    measured = metrics.accuracies(network, splits, batch_size=256)
    assert len(traces) - before == 1
    expected = {name: np.mean(np.argmax(keras.ops.convert_to_numpy(network(images.astype(np.float32))), axis=1) == labels)
                for name, (images, labels) in splits.items() if len(labels)}
    assert measured == {"val": expected["val"], "test": expected["test"], "none": None}
    assert metrics.accuracies(network, {"val": splits["none"]}) == {"val": None}
