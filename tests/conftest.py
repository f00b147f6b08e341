"""Shared test helpers: the repository on sys.path, real CIFAR-10 when available, script runs."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import training  # noqa: E402

training.import_tensorflow()


@pytest.fixture(scope="session")
def cifar10_dir():
    """The real CIFAR-10 folder from $CIFAR10_DIR; tests that need it skip without it."""
    folder = os.environ.get("CIFAR10_DIR")
    if not folder or not os.path.isdir(folder):
        pytest.skip("set CIFAR10_DIR to a cifar-10-batches-py folder to run the tests on real images")
    return folder


@pytest.fixture(scope="session")
def data_flags(cifar10_dir):
    """Command-line flags that select a few hundred real training images."""
    return ["--data_dir", cifar10_dir]


def run_script(script, *arguments, timeout=600, check=True):
    """Run one of the repository's scripts in a fresh process; returns the CompletedProcess."""
    completed = subprocess.run(
        [sys.executable, os.path.join(REPO, script), *map(str, arguments)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    if check and completed.returncode != 0:
        raise AssertionError(f"{script} exited {completed.returncode}\nstdout:\n{completed.stdout[-3000:]}\nstderr:\n{completed.stderr[-3000:]}")
    return completed


def assert_one_line_error(completed):
    """Bad input: exit code 2, exactly one line on stderr, no traceback."""
    assert completed.returncode == 2, (completed.returncode, completed.stderr)
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, completed.stderr
    assert "Traceback" not in completed.stderr
    return lines[0]


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


def temporaries(folder):
    """Files of writes still in progress (training.write_atomically's temporaries) anywhere under `folder`."""
    return [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
            if name.startswith(training.TEMPORARY_PREFIX)]


def assert_files_whole(folder):
    """Every checkpoint and JSON file under `folder` (Keras' own backup aside) opens completely."""
    import json

    import keras

    for root, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if name != "backup"]
        for name in names:
            path = os.path.join(root, name)
            if name.startswith(training.TEMPORARY_PREFIX):
                continue
            if name.endswith(".h5"):
                keras.models.load_model(path, compile=False)
            elif name.endswith(".json"):
                with open(path) as handle:
                    json.load(handle)
