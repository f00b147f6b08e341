"""--distribute mirrored on two logical CPU devices: a few steps compute what one device computes
with the same global batch (losses and weights, the stage's classifier and the Distiller), and the
stage scripts write what a single device writes (the single-device runs are in the stage tests;
their files and keys are spelled out here)."""

import json
import os

import subprocess
import sys

import keras
import pytest

import model as resnet
from conftest import REPO, assert_same_steps, run_script

TINY = ["--dataset", "sample", "--width", "0.0625", "--train_size", "128", "--epoch_num", "1", "--batch_size", "64",
        "--verbose", "0"]


def stage_files(folder):
    history = json.load(open(os.path.join(folder, "history.json")))
    return sorted(os.listdir(folder)), {key: len(values) for key, values in history.items()}


# What a single-device run of one epoch writes (tests/test_base_stage.py and test_prune.py run those).
SINGLE_DEVICE_HISTORY = {key: 1 for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr")}


def distributed_steps(tmp_path, distribute, cpu_devices):
    """tests/distributed_steps.py in a fresh process (logical CPUs are set before TensorFlow starts)."""
    output = tmp_path / "steps.json"
    completed = subprocess.run([sys.executable, os.path.join(REPO, "tests", "distributed_steps.py"), distribute,
                                str(cpu_devices), str(output)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(output.read_text())


def test_mirrored_steps_on_two_cpus_compute_what_one_device_computes(tmp_path):
    assert_same_steps(distributed_steps(tmp_path, "mirrored", 2), replicas=2)


def test_base_training_mirrored_on_two_cpus_writes_what_a_single_device_writes(tmp_path):
    mirrored = str(tmp_path / "mirrored")
    completed = run_script("train_base_model.py", "--save_folder", mirrored, *TINY, "--distribute", "mirrored",
                           "--cpu_devices", "2")
    assert "2 replicas" in completed.stdout
    assert stage_files(mirrored) == (["config.json", "history.json", "model.h5"], SINGLE_DEVICE_HISTORY)
    saved = keras.models.load_model(os.path.join(mirrored, "model.h5"), compile=False)
    assert resnet.describe_model(saved)[0] == resnet.width_spec(0.0625)


@pytest.mark.slow  # make test-all
def test_distillation_mirrored_on_two_cpus_writes_what_a_single_device_writes(tmp_path):
    from cnn_compression import checkpoints

    teacher_folder = tmp_path / "iter1"
    teacher_folder.mkdir()
    checkpoints.save_model(resnet.build_resnet50(resnet.width_spec(0.125)), str(teacher_folder / "model.h5"))
    common = [f"--root_folder={teacher_folder}", "--student_stage_widths", "4,4,8,8", *TINY[:2], *TINY[4:]]
    mirrored = str(tmp_path / "mirrored")
    run_script("knowledge_distillation.py", *common, "--save_folder", mirrored, "--distribute", "mirrored", "--cpu_devices", "2")
    # What a single-device run writes (tests/test_distillation.py runs that one): the same files and keys.
    terms = ["train_loss", "train_acc", "val_loss", "val_acc", "lr", "train_cross_entropy", "train_backbone_loss",
             "train_intermediate_loss", "train_adversarial_loss", "train_discriminator_loss"]
    assert stage_files(mirrored) == (["config.json", "history.json", "model.h5"], {key: 1 for key in terms})
    assert resnet.describe_model(keras.models.load_model(os.path.join(mirrored, "model.h5"), compile=False))[0]["stages"] == [4, 4, 8, 8]


@pytest.mark.slow  # make test-all
def test_pruning_fine_tunes_mirrored_on_two_cpus_like_single_device(tmp_path, base_path):
    base = str(base_path)  # conftest's: a fresh width-0.0625 ResNet50
    mirrored = str(tmp_path / "mirrored")
    run_script("prune_model.py", "--base_model_path", base, "--prune_iter", "1", "--criterion", "fraction",
               "--prune_fraction", "0.25", *TINY[:2], *TINY[4:], "--root_folder", mirrored,
               "--distribute", "mirrored", "--cpu_devices", "2")
    assert stage_files(os.path.join(mirrored, "iter1")) == (["apoz.json", "history.json", "model.h5", "pruned.json"],
                                                             SINGLE_DEVICE_HISTORY)
    # The fraction rule removes a quarter of every inner layer, whatever the device count.
    expected = resnet.width_spec(0.0625)
    expected["blocks"] = [[width - round(0.25 * width) for width in pair] for pair in expected["blocks"]]
    assert json.load(open(os.path.join(mirrored, "summary.json")))["iterations"][0]["width_spec"] == expected
