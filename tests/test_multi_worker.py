"""--distribute multi_worker with real worker processes on 127.0.0.1: TF_CONFIG checks, steps that
compute what one device computes (losses and weights), training that matches a single-process run,
and a resume after one worker is SIGKILLed. Every wait is bounded."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import keras
import pytest

from cnn_compression import cli
import launch_workers
import model as resnet
from cnn_compression import multi_worker
from conftest import REPO, assert_one_line_error, assert_same_steps, run_script

DATA = ["--dataset", "sample", "--train_size", "256", "--batch_size", "64", "--warmup_epochs", "0", "--verbose", "2"]
TINY = ["--width", "0.0625", "--stem", "cifar", *DATA]  # the base model's
WORKER_TIMEOUT = 400  # seconds a whole two-worker run may take on 2 busy cores


def config(workers, task_type="worker", index=0):
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": task_type, "index": index}})


@pytest.mark.parametrize("raw, message", [
    (None, "needs TF_CONFIG"),
    ("{not json", "malformed"),
    (json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}}), "malformed"),
    (config(["127.0.0.1:1", "127.0.0.1:2"], index=2), "outside the cluster"),
    (config(["127.0.0.1:1"], task_type="ps"), "not in its cluster"),
    (config(["no-port"]), "host:port"),
])
def test_bad_tf_config_is_a_user_error(raw, message):
    with pytest.raises(cli.UserError, match=message):
        multi_worker.read_tf_config({} if raw is None else {"TF_CONFIG": raw})


def test_chief_is_worker_zero_unless_a_chief_task_exists():
    assert multi_worker.is_chief({"worker": ["a:1", "b:2"]}, "worker", 0)
    assert not multi_worker.is_chief({"worker": ["a:1", "b:2"]}, "worker", 1)
    assert not multi_worker.is_chief({"chief": ["c:3"], "worker": ["a:1"]}, "worker", 0)
    assert multi_worker.is_chief({"chief": ["c:3"], "worker": ["a:1"]}, "chief", 0)


def test_missing_tf_config_or_a_busy_port_exits_2_in_one_line(tmp_path):
    environment = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    arguments = [sys.executable, "train_base_model.py", "--save_folder", str(tmp_path / "out"), *TINY, "--epoch_num", "1",
                 "--distribute", "multi_worker"]
    missing = subprocess.run(arguments, cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)
    assert "TF_CONFIG" in assert_one_line_error(missing)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        environment["TF_CONFIG"] = config([f"127.0.0.1:{port}", "127.0.0.1:1"])
        taken = subprocess.run(arguments, cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)
    assert f"port {port}" in assert_one_line_error(taken)
    assert not os.path.exists(tmp_path / "out")


def test_two_workers_steps_compute_what_one_device_computes(tmp_path):
    """Two worker processes (one CPU each) train the stage's classifier and a Distiller for 4 steps
    of a global batch of 32 (tests/distributed_steps.py); each worker then runs the same steps on
    one device: the same losses at every step and the same weights."""
    output = tmp_path / "steps.json"
    code = launch_workers.launch([os.path.join(REPO, "tests", "distributed_steps.py"), "multi_worker", "1", str(output)], 2,
                                 log_dir=str(tmp_path / "logs"), timeout=WORKER_TIMEOUT)
    assert code == 0, open(tmp_path / "logs" / "worker0.log").read()[-3000:]
    for index in (0, 1):
        assert_same_steps(json.loads(open(f"{output}.{index}").read()), replicas=2)


def start_workers(arguments, logs):
    ports = launch_workers.free_ports(2)
    processes = []
    for index, tf_config in enumerate(launch_workers.tf_configs(ports)):
        output = open(logs / f"worker{index}.log", "w")
        processes.append(subprocess.Popen([sys.executable, *arguments], cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                                          env={**os.environ, "TF_CONFIG": tf_config}))
    return processes


def history_length(folder):
    try:
        return len(json.load(open(os.path.join(folder, "history.json")))["val_acc"])
    except (OSError, ValueError, KeyError):
        return 0


def scratch_folders():
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("worker1-")}


@pytest.mark.slow  # make test-all
def test_two_workers_resume_after_a_kill_and_match_a_single_process_run(tmp_path):
    single = str(tmp_path / "single")
    run_script("train_base_model.py", "--save_folder", single, *TINY, "--epoch_num", "3")
    folder = str(tmp_path / "multi")
    arguments = ["train_base_model.py", "--save_folder", folder, *TINY, "--epoch_num", "3", "--distribute", "multi_worker"]
    scratch_before = scratch_folders()
    chief, other = start_workers(arguments, tmp_path)
    deadline = time.monotonic() + WORKER_TIMEOUT
    try:
        while history_length(folder) < 1:
            assert chief.poll() is None and other.poll() is None, open(tmp_path / "worker0.log").read()[-3000:]
            assert time.monotonic() < deadline, "the workers never finished an epoch"
            time.sleep(0.05)
        other.send_signal(signal.SIGKILL)  # the non-chief dies mid-run; the chief is left waiting for it
    finally:
        for process in (other, chief):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert 1 <= history_length(folder) < 3
    logs = tmp_path / "rerun"
    code = launch_workers.launch(arguments, 2, log_dir=str(logs), timeout=WORKER_TIMEOUT)
    chief_log = open(logs / "worker0.log").read()
    assert code == 0, chief_log[-3000:]
    assert "resuming" in chief_log and "Epoch 1/3" not in chief_log  # continued after the last finished epoch
    # The chief's files are a single process's: same names, keys, epochs and widths.
    names = ["config.json", "history.json", "model.h5"]
    assert sorted(os.listdir(folder)) == sorted(os.listdir(single)) == names
    multi_history = json.load(open(os.path.join(folder, "history.json")))
    single_history = json.load(open(os.path.join(single, "history.json")))
    assert {k: len(v) for k, v in multi_history.items()} == {k: len(v) for k, v in single_history.items()}
    specs = [resnet.describe_model(keras.models.load_model(os.path.join(f, "model.h5"), compile=False))[0] for f in (folder, single)]
    assert specs[0] == specs[1] == resnet.width_spec(0.0625)
    # Same global batch and data: validation accuracy within noise (200 images: 0.1 is about three standard errors).
    assert abs(max(multi_history["val_acc"]) - max(single_history["val_acc"])) <= 0.1
    config_json = json.load(open(os.path.join(folder, "config.json")))
    assert config_json["complete"] and config_json["arguments"]["distribute"] == "multi_worker"
    assert scratch_folders() == scratch_before  # the other worker's scratch copies are gone


@pytest.mark.slow  # make test-all
def test_two_workers_distil_like_a_single_process(tmp_path):
    from cnn_compression import checkpoints

    teacher_folder = tmp_path / "iter1"
    teacher_folder.mkdir()
    checkpoints.save_model(resnet.build_resnet50(resnet.width_spec(0.125), "cifar"), str(teacher_folder / "model.h5"))
    folder = str(tmp_path / "student")
    code = launch_workers.launch(
        ["knowledge_distillation.py", f"--root_folder={teacher_folder}", "--student_stage_widths", "4,4,8,8",
         "--save_folder", folder, *DATA, "--epoch_num", "1", "--distribute", "multi_worker"],
        2, log_dir=str(tmp_path / "logs"), timeout=WORKER_TIMEOUT)
    assert code == 0, open(tmp_path / "logs" / "worker0.log").read()[-3000:]
    # What a single process writes (tests/test_distillation.py): the same files and history keys.
    terms = ["train_loss", "train_acc", "val_loss", "val_acc", "lr", "train_cross_entropy", "train_backbone_loss",
             "train_intermediate_loss", "train_adversarial_loss", "train_discriminator_loss"]
    history = json.load(open(os.path.join(folder, "history.json")))
    assert sorted(os.listdir(folder)) == ["config.json", "history.json", "model.h5"]
    assert {key: len(values) for key, values in history.items()} == {key: 1 for key in terms}
