"""--distribute mirrored on two logical CPU devices writes what a single device writes."""

import json
import os

import keras

import model as resnet
from conftest import run_script

TINY = ["--dataset", "sample", "--width", "0.0625", "--train_size", "128", "--epoch_num", "1", "--batch_size", "64",
        "--verbose", "0"]


def stage_files(folder):
    history = json.load(open(os.path.join(folder, "history.json")))
    return sorted(os.listdir(folder)), {key: len(values) for key, values in history.items()}


def test_base_training_mirrored_on_two_cpus_matches_single_device(tmp_path):
    single, mirrored = str(tmp_path / "single"), str(tmp_path / "mirrored")
    run_script("train_base_model.py", "--save_folder", single, *TINY)
    completed = run_script("train_base_model.py", "--save_folder", mirrored, *TINY, "--distribute", "mirrored",
                           "--cpu_devices", "2")
    assert "2 replicas" in completed.stdout
    assert stage_files(single) == stage_files(mirrored)
    saved = keras.models.load_model(os.path.join(mirrored, "model.h5"), compile=False)
    assert resnet.describe_model(saved)[0] == resnet.width_spec(0.0625)
