"""Shared test helpers: real CIFAR-10 images (the bundled sample for
stage runs; the full set, when $CIFAR10_DIR is set, for the data tests and one stage run), script runs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cnn_compression  # noqa: E402
from cnn_compression import cli  # noqa: E402
from cnn_compression import files  # noqa: E402

cnn_compression.setup()  # TensorFlow quietly, and the fused BatchNorm the stages run


# Seconds of each file's non-slow tests under make test (two workers, junit times summed per file;
# AMD EPYC Zen 4, 2 cores, 2026-12-03, the strong run paused: 308 passed in 458 s). The two xdist workers take
# whole files in this order, longest first, so that no long file starts last and runs alone at the
# end (make test passes --no-loadscope-reorder, which keeps this order). A new file: estimate it,
# then measure.
FILE_SECONDS = {
    "test_base_stage.py": 114, "test_prune.py": 110, "test_output_folders.py": 83, "test_crash_safety.py": 72,
    "test_distribute.py": 67, "test_prune_distill.py": 59, "test_distillation.py": 59,
    "test_any_model.py": 46, "test_prune_any_model.py": 43, "test_export.py": 36, "test_multi_worker.py": 28,
    "test_model.py": 25, "test_fused_batch_norm.py": 23, "test_importance.py": 22,
    "test_distill_any_model.py": 19, "test_batch_norm_folding.py": 12, "test_bad_input.py": 19, "test_plots.py": 18, "test_onednn.py": 15,
    "test_precision.py": 9, "test_data.py": 5, "test_reproduction.py": 3, "test_metrics.py": 2,
    "test_strided_pointwise.py": 1, "test_layout.py": 1,
}


@pytest.fixture(autouse=True)
def float32_policy_after_each_test():
    """A stage's main run in process sets Keras' global precision policy (--precision auto is
    mixed_bfloat16 on a CPU with AMX); the next test in the worker must not inherit it."""
    yield
    import keras

    keras.mixed_precision.set_global_policy("float32")


def pytest_collection_modifyitems(items):
    """Longest files first (see FILE_SECONDS); the order within a file is kept."""
    items.sort(key=lambda item: -FILE_SECONDS.get(os.path.basename(str(item.fspath)), 0))


def full_cifar10_dir():
    """The full CIFAR-10 folder named by $CIFAR10_DIR, or None."""
    folder = os.environ.get("CIFAR10_DIR")
    return folder if folder and os.path.isdir(folder) else None


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory):
    """A cifar-10-batches-py folder of real images: the full set from $CIFAR10_DIR, else the bundled
    sample written in the official format (five training batches and a test batch)."""
    folder = full_cifar10_dir()
    if folder:
        return folder
    import pickle

    from cnn_compression import data

    x_train, y_train, x_test, y_test = data.load_sample()
    folder = tmp_path_factory.mktemp("sample") / data.FOLDER_NAME
    folder.mkdir()

    def write(name, images, labels):
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": rows, b"labels": [int(label) for label in labels]}, handle)

    for index, part in enumerate(np.array_split(np.arange(len(y_train)), len(data.TRAIN_FILES))):
        write(data.TRAIN_FILES[index], x_train[part], y_train[part])
    write(data.TEST_FILE, x_test, y_test)
    return str(folder)


@pytest.fixture(scope="session")
def data_flags():
    """Command-line flags for a stage run on real images: the bundled CIFAR-10 sample (200 validation
    and 500 test images). The full set's 15,000 validation and test images, measured at every epoch
    and every stage's close, cost most of a tiny run's time; one run goes through the full set
    (full_data_flags) and test_data.py checks its split."""
    return ["--dataset", "sample"]


@pytest.fixture(scope="session")
def full_data_flags():
    """Flags selecting the full CIFAR-10 when $CIFAR10_DIR is set (CI sets it), else the sample."""
    folder = full_cifar10_dir()
    return ["--data_dir", folder] if folder else ["--dataset", "sample"]


def perturb_batch_norms(network, seed=0):
    """Set every BatchNorm's gamma (negative ones too), beta and moving statistics at random, so
    that channels differ in every criterion (APoZ, |gamma|, L1 downstream, Taylor)."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in network.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([rng.uniform(-1.5, 1.5, gamma.shape).astype("float32"),
                               rng.uniform(-0.5, 0.3, beta.shape).astype("float32"),
                               rng.normal(0, 0.1, mean.shape).astype("float32"),
                               rng.uniform(0.8, 1.2, variance.shape).astype("float32")])
    return network


def pixel_classifier():
    """A convolution and a dense softmax over its flattened map, for tests where any saved classifier
    will do (--verify reloads any): it traces in a fraction of a second where a ResNet50 takes
    seconds. Fresh weights over a flattened map predict a spread of classes (a pooled head would
    answer one class for every image), so two seeds give two accuracies."""
    import keras

    inputs = keras.Input((32, 32, 3))
    features = keras.layers.Conv2D(8, 3, strides=4, activation="relu")(keras.layers.Rescaling(1 / 255)(inputs))
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(features)))


TINY_WIDTH = 0.0625  # stem 4, blocks 4..32, stages 16..128: every layer prunable, cheap to trace


@pytest.fixture(scope="module")
def network():
    """A tiny CIFAR-stem ResNet50 whose BatchNorms are
    perturbed so that channels differ. Module-scoped: a test that changes it works on a copy."""
    import model as resnet
    from cnn_compression import training

    training.set_seed(0)
    return perturb_batch_norms(resnet.build_resnet50(resnet.width_spec(TINY_WIDTH), "cifar", 10))


@pytest.fixture(scope="session")
def base_path(tmp_path_factory):
    """A freshly initialised tiny ResNet50 saved as a base model for prune_model.py runs."""
    from cnn_compression import checkpoints
    import model as resnet
    from cnn_compression import training

    path = tmp_path_factory.mktemp("base") / "base.h5"
    training.set_seed(0)
    checkpoints.save_model(resnet.build_resnet50(resnet.width_spec(TINY_WIDTH), "imagenet", 10), str(path))
    return path


def model_arrays(path):
    """Every array of a saved model (weights and optimizer-free), by its name in the file."""
    import h5py

    arrays = {}
    with h5py.File(path, "r") as archive:
        archive.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


def run_script(script, *arguments, timeout=600, check=True):
    """Run one of the repository's scripts in a new process; returns the CompletedProcess. For what
    only a new process shows: its start-up (TensorFlow's own messages, the time to answer), flags
    TensorFlow reads once at start (--cpu_devices), a run another process must kill or race. Else
    `run_in_process`, which saves the 7-10 s of imports a new process pays."""
    completed = subprocess.run(
        [sys.executable, os.path.join(REPO, script), *map(str, arguments)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    if check and completed.returncode != 0:
        raise AssertionError(f"{script} exited {completed.returncode}\nstdout:\n{completed.stdout[-3000:]}\nstderr:\n{completed.stderr[-3000:]}")
    return completed


def run_in_process(script, *arguments, check=True):
    """Run a script's `main` through `cli.run` in this process, as `run_script` would in a new one
    (its stdout and stderr captured, exit code 2 on bad input); returns a CompletedProcess."""
    import contextlib
    import importlib
    import io

    module = importlib.import_module(os.path.splitext(script)[0])
    argv = [str(argument) for argument in arguments]
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd, code = sys.argv, os.getcwd(), 0
    sys.argv = [os.path.join(REPO, script), *argv]
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            cli.run(lambda: module.main(argv))
    except SystemExit as exited:
        code = exited.code if isinstance(exited.code, int) else 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        files.release_folder_locks()
    completed = subprocess.CompletedProcess([script, *argv], code, stdout.getvalue(), stderr.getvalue())
    if check and code != 0:
        raise AssertionError(f"{script} exited {code}\nstdout:\n{completed.stdout[-3000:]}\nstderr:\n{completed.stderr[-3000:]}")
    return completed


def assert_one_line_error(completed):
    """Bad input: exit code 2, exactly one line on stderr, no traceback."""
    assert completed.returncode == 2, (completed.returncode, completed.stderr)
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, completed.stderr
    assert "Traceback" not in completed.stderr
    return lines[0]


def epoch_backed_up(folder, epoch=1):
    """A `kill_when` condition: `folder`'s BackupAndRestore has recorded `epoch` finished epochs
    (its metadata is the backup's last write, so a rerun must resume after them)."""
    marker = folder / "backup" / "training_metadata.json"

    def condition():
        try:
            return json.loads(marker.read_text())["epoch"] == epoch
        except (OSError, ValueError, KeyError):
            return False

    return condition


def kill_when(arguments, condition, timeout=300, stdout=None, may_finish=False):
    """Start a script run (`arguments`: script, then flags) and SIGKILL it as soon as `condition()` holds.

    Fails if the run ends (unless `may_finish`: then returns False) or stalls first; returns True
    once killed. `stdout`: an open file for the run's output (else discarded).
    """
    import signal
    import time

    process = subprocess.Popen([sys.executable, *map(str, arguments)], cwd=REPO,
                               stdout=stdout or subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not condition():
            if process.poll() is not None:
                if may_finish:
                    return False
                pytest.fail(f"{arguments[0]} ended (exit {process.returncode}) before it reached the kill point")
            if time.monotonic() > deadline:
                pytest.fail(f"{arguments[0]} never reached the kill point")
            time.sleep(0.01)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
    return True


def assert_same_steps(result, replicas):
    """tests/distributed_steps.py's output: the distributed steps against the one-device steps, the
    same losses at every step, the same weights (to float32 summation order), from the same start,
    and the steps really changed the weights."""
    assert result["replicas"] == replicas
    for kind in ("classifier", "distiller"):
        steps = result[kind]
        assert len(steps["losses"]) == len(steps["single_losses"]) == 4, kind
        assert steps["losses"] == pytest.approx(steps["single_losses"], rel=1e-5), kind
        assert steps["start"] == 0 and steps["moved"] > 1e-3, kind
        # a loss summed instead of averaged over the replicas would move the weights twice as far
        assert steps["weights"] < 1e-5 < steps["moved"] / 100, kind


def folder_bytes(folder):
    """{relative path: bytes} of every file under `folder`: equal before and after means untouched."""
    contents = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                contents[os.path.relpath(path, folder)] = handle.read()
    return contents


def temporaries(folder):
    """Files of writes still in progress (files.write_atomically's temporaries) anywhere under `folder`."""
    return [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
            if name.startswith(files.TEMPORARY_PREFIX)]


def assert_files_whole(folder):
    """Every checkpoint and JSON file under `folder` (Keras' own backup aside) opens completely."""
    import json

    import keras

    for root, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if name != "backup"]
        for name in names:
            path = os.path.join(root, name)
            if name.startswith(files.TEMPORARY_PREFIX):
                continue
            if name.endswith(".h5"):
                keras.models.load_model(path, compile=False)
            elif name.endswith(".json"):
                with open(path) as handle:
                    json.load(handle)
