"""CIFAR-10 input: finding the files, the fixed train/validation/test split, and tf.data pipelines.

Images stay uint8 (0-255) all the way to the model, which normalises its own input.
"""

import gzip
import hashlib
import io
import os
import pickle
import tarfile
from dataclasses import dataclass

import numpy as np

from cnn_compression.errors import UserError

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
VALIDATION_SIZE = 5000
# The split must not move with --seed: every stage selects on the same validation images, and
# none of them may ever have been trained on.
SPLIT_SEED = 20161213
# The bundled sample lives in the repository (sample/), one level above this package.
SAMPLE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample", "cifar10_sample.npz.gz")
SAMPLE_MD5_PATH = SAMPLE_PATH[: -len(".npz.gz")] + ".md5"
SAMPLE_VALIDATION_SIZE = 200
TRAIN_FILES = [f"data_batch_{index}" for index in range(1, 6)]
TEST_FILE = "test_batch"
TARBALL_NAME = "cifar-10-python.tar.gz"
FOLDER_NAME = "cifar-10-batches-py"
DATASETS = ("cifar10", "sample")


class DataError(UserError):
    """The data set cannot be found or read; the message says what to pass."""


@dataclass
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str

    def sizes(self):
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    def fingerprint(self):
        """A digest of every image and label: the same data wherever it was read from."""
        from cnn_compression.files import fingerprint_arrays

        return fingerprint_arrays(self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test)


def _decode_batch(raw):
    batch = pickle.loads(raw, encoding="bytes")
    try:
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (KeyError, ValueError, TypeError, IndexError) as error:  # TypeError, IndexError: pickled, but no dict
        raise DataError(f"not a CIFAR-10 batch file ({type(error).__name__}: {error})") from None
    if len(images) != len(labels):
        raise DataError("a CIFAR-10 batch has different numbers of images and labels")
    return images, labels


def _read_batches(read):
    """`read(name)` returns the bytes of one batch file; returns (x_train, y_train, x_test, y_test)."""
    train = [_decode_batch(read(name)) for name in TRAIN_FILES]
    x_test, y_test = _decode_batch(read(TEST_FILE))
    x_train = np.concatenate([images for images, _ in train])
    y_train = np.concatenate([labels for _, labels in train])
    return x_train, y_train, x_test, y_test


def _read_folder(folder):
    def read(name):
        with open(os.path.join(folder, name), "rb") as handle:
            return handle.read()

    return _read_batches(read)


def _read_tarball(path):
    with tarfile.open(path, "r:gz") as archive:
        members = {os.path.basename(member.name): member for member in archive.getmembers() if member.isfile()}

        def read(name):
            if name not in members:
                raise DataError(f"{path} has no {name}: not the official {TARBALL_NAME}")
            return archive.extractfile(members[name]).read()

        return _read_batches(read)


def _is_folder(path):
    return os.path.isdir(path) and all(os.path.isfile(os.path.join(path, name)) for name in TRAIN_FILES + [TEST_FILE])


def _resolve(path):
    """A CIFAR-10 folder or tarball at `path` (or inside it), or None."""
    if os.path.isfile(path) and path.endswith(".tar.gz"):
        return path
    for candidate in (path, os.path.join(path, FOLDER_NAME)):
        if _is_folder(candidate):
            return candidate
    tarball = os.path.join(path, TARBALL_NAME)
    return tarball if os.path.isfile(tarball) else None


def _read(location):
    try:
        if os.path.isfile(location):
            return _read_tarball(location)
        return _read_folder(location)
    except (OSError, EOFError, pickle.UnpicklingError, tarfile.TarError) as error:
        raise DataError(f"cannot read CIFAR-10 at {location}: {error}") from None


def load_cifar10(data_dir=None):
    """The 50,000 training and 10,000 test images as uint8 NHWC arrays, plus where they came from.

    Looks, in order, at `data_dir`, $CIFAR10_DIR, the Keras cache, then lets Keras download.
    """
    if data_dir:
        location = _resolve(data_dir)
        if location is None:
            raise DataError(
                f"--data_dir {data_dir} holds neither a {FOLDER_NAME} folder with data_batch_1..5 and test_batch nor {TARBALL_NAME}"
            )
        return (*_read(location), location)
    environment = os.environ.get("CIFAR10_DIR")
    if environment:
        location = _resolve(environment)
        if location is None:
            raise DataError(f"CIFAR10_DIR={environment} holds neither a {FOLDER_NAME} folder nor {TARBALL_NAME}")
        return (*_read(location), location)
    cache = os.path.join(os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras")), "datasets")
    location = _resolve(cache)
    if location is not None:
        return (*_read(location), location)
    try:
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as error:  # any download failure ends in the same advice
        raise DataError(
            f"CIFAR-10 not found and could not be downloaded ({type(error).__name__}); "
            f"pass --data_dir=PATH/{FOLDER_NAME} (or {TARBALL_NAME}), set CIFAR10_DIR, or use --dataset sample"
        ) from None
    return x_train, y_train.reshape(-1), x_test, y_test.reshape(-1), "keras.datasets.cifar10"


def stratified_indices(labels, size, seed):
    """`size` indices of `labels`, the same share from every class, fixed by `seed`, sorted."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if not 0 < size <= len(labels):
        raise ValueError(f"cannot take {size} of {len(labels)} images")
    rng = np.random.default_rng(seed)
    # Largest-remainder apportionment keeps the total exact when size is not a multiple of classes.
    quotas = counts * size / len(labels)
    takes = np.floor(quotas).astype(int)
    remainder = size - takes.sum()
    takes[np.argsort(-(quotas - takes), kind="stable")[:remainder]] += 1
    chosen = [rng.choice(np.flatnonzero(labels == cls), take, replace=False) for cls, take in zip(classes, takes)]
    return np.sort(np.concatenate(chosen))


def split_train_validation(x, y, validation_size, seed=SPLIT_SEED):
    validation = stratified_indices(y, validation_size, seed)
    train = np.setdiff1d(np.arange(len(y)), validation)
    return x[train], y[train], x[validation], y[validation]


def load_sample():
    try:
        with gzip.open(SAMPLE_PATH, "rb") as handle:
            arrays = np.load(io.BytesIO(handle.read()))
            return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]
    except (OSError, KeyError, ValueError) as error:
        folder = os.path.dirname(SAMPLE_PATH)
        if not os.path.exists(SAMPLE_PATH) and not os.path.exists(os.path.join(folder, "make_sample.py")):
            # An installed copy (pip install): the sample stays in the repository's checkout.
            raise DataError("--dataset sample needs the sample bundled with the repository's checkout, which this "
                            "installed copy has not; pass --data_dir with a cifar-10-batches-py folder") from None
        raise DataError(f"cannot read the bundled sample {SAMPLE_PATH}: {error}; rebuild it with "
                        f"{os.path.join(folder, 'make_sample.py')}") from None


def file_md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_split(dataset="cifar10", data_dir=None, train_size=None, seed=0):
    """Train / validation / test arrays. `train_size` keeps a stratified subset of the training split."""
    if dataset == "cifar10":
        x_train, y_train, x_test, y_test, source = load_cifar10(data_dir)
        validation_size = VALIDATION_SIZE
    elif dataset == "sample":
        x_train, y_train, x_test, y_test = load_sample()
        source = SAMPLE_PATH
        validation_size = SAMPLE_VALIDATION_SIZE
    else:
        raise DataError(f"unknown --dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    x_train, y_train, x_val, y_val = split_train_validation(x_train, y_train, validation_size)
    if train_size is not None:
        if not 0 < train_size <= len(y_train):
            raise DataError(f"--train_size must be between 1 and {len(y_train)}, got {train_size}")
        keep = stratified_indices(y_train, train_size, seed)
        x_train, y_train = x_train[keep], y_train[keep]
    return Split(x_train, y_train, x_val, y_val, x_test, y_test, source)


def _augment(images, seed):
    """Pad by 4, take a random 32x32 crop and flip half the images: vectorised over the batch.

    The draws are stateless, a function of `seed` (shape [2]) alone, so a batch augments the same
    way whichever thread of the parallel map, or which run, computes it.
    """
    import tensorflow as tf

    batch = tf.shape(images)[0]
    height, width = images.shape[1], images.shape[2]
    offset_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    padded = tf.pad(images, [[0, 0], [4, 4], [4, 4], [0, 0]])
    offsets = tf.random.stateless_uniform([batch, 2], offset_seed, minval=0, maxval=9, dtype=tf.int32)
    rows = offsets[:, :1] + tf.range(height)[None, :]
    cols = offsets[:, 1:] + tf.range(width)[None, :]
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    cropped = tf.gather(cropped, cols, axis=2, batch_dims=1)
    flip = tf.random.stateless_uniform([batch], flip_seed) < 0.5
    return tf.where(flip[:, None, None, None], tf.reverse(cropped, axis=[2]), cropped)


def drops_remainder(example_count, batch_size):
    """Whether a training epoch leaves out its last, partial batch: whenever there is a full one.

    BatchNorm's batch statistics over a few images are wild where the feature maps are small (the
    ImageNet stem's last stage is 1x1 on CIFAR): the committed base's gradient norm on batches of
    16 has a median 22x and a maximum 150x that of batches of 128, and fine-tuning it on 10,000
    images (a last batch of 16) collapsed in 2 runs of 8 at the end of an epoch. Reshuffling
    leaves out other images each epoch.
    """
    return example_count >= batch_size


def training_steps(example_count, batch_size):
    """Batches in one training epoch of `make_dataset(..., training=True)`."""
    if drops_remainder(example_count, batch_size):
        return example_count // batch_size
    return 1 if example_count else 0


def make_dataset(images, labels, batch_size, training=False, seed=0, class_num=10, first_epoch=0, epoch_num=None):
    """A tf.data pipeline of (float32 0-255 images, one-hot labels).

    Evaluation (`training` False): every image once, in order. Training: the epochs `first_epoch`
    up to `epoch_num` (default: the one epoch `first_epoch`) one after another, each in full
    batches only (`drops_remainder`), randomly cropped and flipped. Epoch e is a pure function of
    (seed, e): its order a stateless permutation seeded by (seed, e), batch b's crops and flips
    seeded by (seed, e, b). So the pipeline a resumed fit builds from its resume epoch yields
    exactly the batches the uninterrupted fit trained on from there.
    """
    import tensorflow as tf

    # Under multi-worker training each worker keeps every N-th batch element (there are no files to shard).
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    if not training:
        dataset = tf.data.Dataset.from_tensor_slices((images, labels)).with_options(options).batch(batch_size)
    else:
        dataset = _training_batches(images, labels, batch_size, seed, first_epoch,
                                    first_epoch + 1 if epoch_num is None else epoch_num).with_options(options)
    dataset = dataset.map(
        lambda x, y: (tf.cast(x, tf.float32), tf.one_hot(y, class_num)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return dataset.prefetch(tf.data.AUTOTUNE)


def _training_batches(images, labels, batch_size, seed, first_epoch, epoch_num):
    """Augmented uint8 batches of the epochs first_epoch..epoch_num-1, each a function of (seed, epoch)."""
    import tensorflow as tf

    images, labels = tf.constant(images), tf.constant(labels)
    count = int(labels.shape[0])
    drop_remainder = drops_remainder(count, batch_size)

    def epoch_batches(epoch):
        epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])
        order = tf.random.experimental.stateless_shuffle(tf.range(count, dtype=tf.int64), epoch_seed)
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder=drop_remainder)
        return batches.enumerate().map(lambda index, chosen: (tf.random.experimental.stateless_fold_in(epoch_seed, index), chosen))

    def augmented(batch_seed, chosen):
        # Augmenting whole batches costs a few ops per batch instead of per image.
        return _augment(tf.gather(images, chosen), batch_seed), tf.gather(labels, chosen)

    epochs = tf.data.Dataset.range(first_epoch, max(first_epoch, epoch_num))
    return epochs.flat_map(epoch_batches).map(augmented, num_parallel_calls=tf.data.AUTOTUNE)


@dataclass(eq=False)
class TrainingData:
    """A stage's training images and how its epochs batch, order and augment them.

    `fit_stage` builds the pipeline from the epoch its fit starts at (`epochs`), so a resumed
    stage trains on exactly the batches an uninterrupted one would have.
    """

    images: np.ndarray
    labels: np.ndarray
    batch_size: int
    seed: int = 0
    class_num: int = 10

    @property
    def steps_per_epoch(self):
        return training_steps(len(self.labels), self.batch_size)

    def epochs(self, first_epoch, epoch_num):
        """The batches of epochs first_epoch..epoch_num-1, one after another (see `make_dataset`)."""
        return make_dataset(self.images, self.labels, self.batch_size, True, self.seed, self.class_num, first_epoch, epoch_num)
