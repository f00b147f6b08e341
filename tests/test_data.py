"""data.py: finding CIFAR-10, the fixed split, the bundled sample and the tf.data pipeline."""

import hashlib
import os
import pickle

import numpy as np
import pytest

import conftest
from cnn_compression import data


def write_fake_cifar(folder, per_batch=20, seed=0):
    """A tiny cifar-10-batches-py with the official pickled layout (uint8 CHW rows, b'labels')."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    batches = {}
    for name in data.TRAIN_FILES + [data.TEST_FILE]:
        images = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [index % 10 for index in range(per_batch)]
        with open(os.path.join(folder, name), "wb") as handle:
            pickle.dump({b"data": images, b"labels": labels, b"batch_label": name.encode()}, handle)
        batches[name] = (images, labels)
    return batches


def test_fake_folder_is_read_in_official_layout(tmp_path):
    folder = str(tmp_path / "cifar-10-batches-py")
    batches = write_fake_cifar(folder)
    x_train, y_train, x_test, y_test, source = data.load_cifar10(str(tmp_path))  # parent folder works too
    assert source == folder
    assert x_train.shape == (100, 32, 32, 3) and x_test.shape == (20, 32, 32, 3)
    first = batches["data_batch_1"][0][0]
    # Row layout is 1024 red, 1024 green, 1024 blue values, row-major.
    np.testing.assert_array_equal(x_train[0, :, :, 0].ravel(), first[:1024])
    np.testing.assert_array_equal(x_train[0, 0, 1], first[[1, 1025, 2049]])
    assert list(y_test) == batches["test_batch"][1]


def test_tarball_is_read(tmp_path):
    import tarfile

    folder = str(tmp_path / "cifar-10-batches-py")
    write_fake_cifar(folder)
    tarball = str(tmp_path / "cifar-10-python.tar.gz")
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(folder, arcname="cifar-10-batches-py")
    from_tar = data.load_cifar10(tarball)
    from_folder = data.load_cifar10(folder)
    for a, b in zip(from_tar[:4], from_folder[:4]):
        np.testing.assert_array_equal(a, b)


def test_environment_variable_is_used(tmp_path, monkeypatch):
    write_fake_cifar(str(tmp_path / "cifar-10-batches-py"))
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path))
    assert data.load_cifar10()[4].endswith("cifar-10-batches-py")


def test_missing_data_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    with pytest.raises(data.DataError, match="--data_dir"):
        data.load_cifar10(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataError, match="neither"):
        data.load_cifar10(str(empty))


def test_stratified_indices_are_exact_and_balanced():
    labels = np.repeat(np.arange(10), 50)
    chosen = data.stratified_indices(labels, 123, seed=1)
    assert len(chosen) == len(set(chosen)) == 123
    counts = np.bincount(labels[chosen], minlength=10)
    assert counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(chosen, data.stratified_indices(labels, 123, seed=1))


def test_real_split_sizes_balance_and_disjointness(cifar10_dir, monkeypatch):
    full = conftest.full_cifar10_dir() is not None
    if not full:  # the sample in the official format: 2,000 training images, 200 of them for validation
        monkeypatch.setattr(data, "VALIDATION_SIZE", data.SAMPLE_VALIDATION_SIZE)
    split = data.load_split("cifar10", cifar10_dir)
    expected = {"train": 45000, "val": 5000, "test": 10000} if full else {"train": 1800, "val": 200, "test": 500}
    assert split.sizes() == expected
    assert split.x_train.shape[1:] == (32, 32, 3) and split.x_train.dtype == np.uint8
    assert np.bincount(split.y_test).tolist() == [expected["test"] // 10] * 10
    assert np.bincount(split.y_val).tolist() == [expected["val"] // 10] * 10
    digests = [{hashlib.md5(image.tobytes()).digest() for image in images}
               for images in (split.x_train, split.x_val, split.x_test)]
    assert not digests[0] & digests[1] and not digests[0] & digests[2] and not digests[1] & digests[2]
    # The validation split never moves with --seed; --train_size subsets are stratified.
    other = data.load_split("cifar10", cifar10_dir, train_size=500, seed=5)
    np.testing.assert_array_equal(other.y_val, split.y_val)
    assert np.bincount(other.y_train).tolist() == [50] * 10


def test_bundled_sample_matches_its_recorded_md5():
    recorded = open(data.SAMPLE_MD5_PATH).read().split()[0]
    assert data.file_md5(data.SAMPLE_PATH) == recorded
    assert os.path.getsize(data.SAMPLE_PATH) <= 10 * 1024 * 1024
    split = data.load_split("sample")
    assert split.sizes() == {"train": 1800, "val": 200, "test": 500}
    assert np.bincount(split.y_val).tolist() == [20] * 10


def test_an_unreadable_sample_says_how_to_rebuild_it_and_an_installed_copy_says_what_to_pass(tmp_path, monkeypatch):
    """In a checkout (make_sample.py beside the file) the error names the script that rebuilds the
    sample; an installed copy has no sample folder, so it names --data_dir instead."""
    checkout = tmp_path / "checkout" / "sample"
    checkout.mkdir(parents=True)
    (checkout / "make_sample.py").write_text("")
    (checkout / "cifar10_sample.npz.gz").write_bytes(b"not gzip")
    monkeypatch.setattr(data, "SAMPLE_PATH", str(checkout / "cifar10_sample.npz.gz"))
    with pytest.raises(data.DataError, match="rebuild it with .*checkout/sample/make_sample.py$"):
        data.load_sample()
    monkeypatch.setattr(data, "SAMPLE_PATH", str(tmp_path / "site-packages" / "sample" / "cifar10_sample.npz.gz"))
    with pytest.raises(data.DataError, match="installed copy has not; pass --data_dir"):
        data.load_sample()


def test_pipeline_augments_training_only():
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(16) % 10
    evaluation = next(iter(data.make_dataset(images, labels, 16)))
    np.testing.assert_array_equal(evaluation[0].numpy(), images.astype("float32"))
    assert evaluation[1].shape == (16, 10)
    np.testing.assert_array_equal(np.argmax(evaluation[1].numpy(), axis=1), labels)
    augmented, onehot = next(iter(data.make_dataset(images, labels, 16, training=True, seed=0)))
    assert augmented.shape == (16, 32, 32, 3)
    assert not np.array_equal(augmented.numpy(), images.astype("float32"))
    # Every augmented image is a flipped or unflipped 32x32 window of its zero-padded original.
    order = np.argmax(onehot.numpy(), axis=1)
    for crop, label in zip(augmented.numpy(), order):
        candidates = [i for i in range(16) if labels[i] == label]
        assert any(_is_window(crop, images[i]) for i in candidates)


def test_training_epochs_leave_out_the_partial_batch_and_evaluation_keeps_every_image():
    labels = np.arange(40) % 10
    images = np.zeros((40, 32, 32, 3), np.uint8)
    for training, batch_size, sizes in ((True, 16, [16, 16]), (True, 64, [40]), (False, 16, [16, 16, 8])):
        batches = [len(y) for _, y in data.make_dataset(images, labels, batch_size, training=training, seed=0)]
        assert batches == sizes
        if training:
            assert len(batches) == data.training_steps(len(labels), batch_size)
    # Reshuffled every epoch: the left-out images change from one epoch to the next.
    epochs = [sorted(np.concatenate(centres(data.make_dataset(indexed_images(40), labels, 16, True, 0, first_epoch=epoch))))
              for epoch in range(3)]
    assert all(len(epoch) == 32 for epoch in epochs) and len({tuple(epoch) for epoch in epochs}) > 1


def indexed_images(count):
    """Images that are their index in every pixel: crops and flips keep it readable at the centre."""
    return np.arange(count, dtype=np.uint8)[:, None, None, None] * np.ones((1, 32, 32, 3), np.uint8)


def centres(dataset):
    """The image indices of every batch of a pipeline over `indexed_images`."""
    return [images.numpy()[:, 16, 16, 0].astype(int) for images, _ in dataset]


def batches(dataset):
    return [(images.numpy(), onehot.numpy()) for images, onehot in dataset]


def test_training_epochs_are_a_function_of_seed_and_epoch():
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(40) % 10

    def epoch(seed, number):
        return batches(data.make_dataset(images, labels, 16, True, seed, first_epoch=number))

    first = epoch(3, 1)
    again = epoch(3, 1)  # a new pipeline, as a resumed run builds
    assert all(np.array_equal(a, b) for batch, same in zip(first, again) for a, b in zip(batch, same))
    for other in (epoch(3, 2), epoch(4, 1)):  # another epoch, another seed: other order and crops
        assert not np.array_equal(first[0][0], other[0][0])
    # Epochs 1..2 in one stream are epoch 1's batches, then epoch 2's.
    stream = batches(data.make_dataset(images, labels, 16, True, 3, first_epoch=1, epoch_num=3))
    expected = first + epoch(3, 2)
    assert len(stream) == 4 and all(np.array_equal(a, b) for batch, same in zip(stream, expected) for a, b in zip(batch, same))


def test_keras_fit_trains_epoch_e_on_the_batches_of_epoch_e():
    """fit_stage hands `fit` one stream of the epochs from the resume epoch on with steps_per_epoch:
    Keras must then read each epoch's batches from where the last epoch stopped, never restart the
    stream (which would train every epoch on the first one's batches). A fit resumed at epoch 1 of 3."""
    import keras

    initial_epoch = 1
    training_data = data.TrainingData(indexed_images(40), np.arange(40) % 10, 16, seed=5)
    seen = []

    class Recording(keras.Model):
        def train_step(self, batch):
            seen.append((self.epoch, batch[0].numpy()[:, 16, 16, 0].astype(int)))
            return {"batches": len(seen)}

    class Epoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            network.epoch = epoch

    inputs = keras.Input((32, 32, 3))
    network = Recording(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(inputs)))
    network.compile(optimizer="sgd", loss="mse", run_eagerly=True)
    network.fit(training_data.epochs(initial_epoch, 3), steps_per_epoch=training_data.steps_per_epoch, epochs=3,
                initial_epoch=initial_epoch, callbacks=[Epoch()], verbose=0, shuffle=False)
    expected = [(epoch, batch) for epoch in range(initial_epoch, 3) for batch in centres(training_data.epochs(epoch, epoch + 1))]
    assert [epoch for epoch, _ in seen] == [epoch for epoch, _ in expected]
    assert all(np.array_equal(batch, wanted) for (_, batch), (_, wanted) in zip(seen, expected))


def _is_window(crop, image):
    padded = np.pad(image.astype("float32"), ((4, 4), (4, 4), (0, 0)))
    for view in (crop, crop[:, ::-1]):
        for row in range(9):
            for col in range(9):
                if np.array_equal(padded[row:row + 32, col:col + 32], view):
                    return True
    return False
