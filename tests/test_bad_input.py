"""Bad input found by an audit of the six scripts (2026-12-03): each case gives one line on stderr
and exit code 2 before any work, and leaves every existing file as it was. Most cases once
crashed with a traceback after the work was done; the first ones destroyed results."""

import json
import os
import pickle

import keras
import numpy as np
import pytest

from cnn_compression import checkpoints
from cnn_compression import data
from cnn_compression import metrics
from cnn_compression import results
import model as resnet
from conftest import TINY_WIDTH, assert_one_line_error, run_in_process

SMALL = ["--width", "0.0625", "--stem", "cifar", "--dataset", "sample", "--train_size", "100", "--batch_size", "50",
         "--epoch_num", "1", "--warmup_epochs", "0", "--verbose", "0"]


def contents(folder):
    """{relative path: bytes} of every file under `folder`."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


@pytest.fixture(scope="module")
def iteration_folder(tmp_path_factory, base_path):
    """A pruning iteration's folder as prune_model.py leaves it: model.h5 and history.json, no config.json."""
    folder = tmp_path_factory.mktemp("copy") / "iter15"
    folder.mkdir()
    (folder / "model.h5").write_bytes(base_path.read_bytes())
    (folder / "history.json").write_text(json.dumps({"train_loss": [1.0], "val_loss": [1.1], "val_acc": [0.3]}))
    return folder


@pytest.mark.parametrize("script, flags", [
    ("train_base_model.py", ["--save_folder", "{folder}", *SMALL]),
    ("knowledge_distillation.py", ["--teacher_path", "{folder}/model.h5", "--save_folder", "{folder}", "--dataset", "sample",
                                   "--epoch_num", "1", "--verbose", "0"]),
])
def test_a_folder_of_results_without_config_is_not_written_over(iteration_folder, script, flags):
    before = contents(iteration_folder)
    completed = run_in_process(script, *[flag.format(folder=iteration_folder) for flag in flags], check=False)
    assert "holds results without config.json (model.h5, history.json)" in assert_one_line_error(completed)
    assert contents(iteration_folder) == before


def test_overwrite_never_removes_the_runs_own_input(tmp_path, base_path):
    """--overwrite moves the old run aside and removes it after the first epoch: an input file of
    the run inside that folder (the base it prunes, the model it starts from) would go with it."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "model.h5").write_bytes(base_path.read_bytes())
    before = contents(folder)
    completed = run_in_process("train_base_model.py", "--save_folder", folder, *SMALL, "--stem", "imagenet",
                               "--model_path", folder / "model.h5", "--overwrite", check=False)
    assert f"--model_path {folder / 'model.h5'} lies in the output folder" in assert_one_line_error(completed)
    assert contents(folder) == before
    completed = run_in_process("prune_model.py", "--root_folder", folder, "--base_model_path", folder / "model.h5",
                               "--dataset", "sample", "--prune_iter", "1", "--epoch_num", "1", "--overwrite", check=False)
    assert f"--base_model_path {folder / 'model.h5'} lies in the output folder" in assert_one_line_error(completed)
    assert contents(folder) == before


@pytest.mark.parametrize("flags, expected", [
    (["--class_num", "5"], "--class_num 5 is below the data's 10 classes"),
    (["--momentum", "5"], "--momentum: '5' must be at most 1"),
    (["--tensorboard", "{file}"], "exists and is not a folder"),
    (["--cpu_devices", "2"], "--cpu_devices 2 splits the CPU for --distribute mirrored"),
])
def test_training_flags_the_run_would_crash_on_are_refused_first(tmp_path, flags, expected):
    existing = tmp_path / "a_file"
    existing.write_text("x")
    folder = tmp_path / "out"
    flags = [flag.format(file=existing) for flag in flags]
    completed = run_in_process("train_base_model.py", "--save_folder", folder, *SMALL, *flags, check=False)
    assert expected in assert_one_line_error(completed)
    assert not folder.exists()


def test_pruning_refuses_a_floor_that_leaves_nothing_to_prune(tmp_path, base_path):
    """--min_channels above every width: the run scored, pruned nothing and fine-tuned a whole iteration."""
    completed = run_in_process("prune_model.py", "--root_folder", tmp_path / "pruned", "--base_model_path", base_path,
                               "--dataset", "sample", "--prune_iter", "1", "--min_channels", "100000", check=False)
    assert "--min_channels 100000 is at least the width of every channel group" in assert_one_line_error(completed)
    assert not (tmp_path / "pruned").exists()


def test_evaluate_refuses_a_json_path_it_cannot_or_must_not_write(tmp_path, base_path):
    model = tmp_path / "model.h5"
    model.write_bytes(base_path.read_bytes())
    (tmp_path / "a_file").write_text("x")
    for json_path, expected in ((model, "is the --model_path file"), (tmp_path / "a_file" / "out.json", "which is a file"),
                                (tmp_path, "is a folder")):
        completed = run_in_process("evaluate_model.py", "--model_path", model, "--dataset", "sample", "--latency_repeats", "0",
                                   "--json", json_path, check=False)
        assert expected in assert_one_line_error(completed), json_path
    assert model.read_bytes() == base_path.read_bytes()


def test_evaluate_and_export_refuse_a_model_that_is_not_a_cifar10_classifier(tmp_path):
    inputs = keras.Input((32, 32, 3))
    hundred = keras.Model(inputs, keras.layers.Dense(100, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inputs)))
    path = str(tmp_path / "hundred.h5")
    checkpoints.save_model(hundred, path)
    for script, flags in (("evaluate_model.py", ["--latency_repeats", "0"]), ("export_model.py", [])):
        completed = run_in_process(script, "--model_path", path, "--dataset", "sample", *flags, check=False)
        assert "needs one (None, 10) row of class scores" in assert_one_line_error(completed), script


def test_a_model_with_nan_weights_is_refused_not_measured(tmp_path):
    """It evaluated to chance (10%) with exit code 0."""
    network = resnet.build_resnet50(resnet.width_spec(TINY_WIDTH), "cifar", 10)
    kernel = network.get_layer("conv1_conv").kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    path = tmp_path / "nan.h5"
    checkpoints.save_model(network, str(path))
    completed = run_in_process("evaluate_model.py", "--model_path", path, "--dataset", "sample", "--latency_repeats", "0",
                               check=False)
    assert "holds non-finite weights (NaN or infinity) in conv1_conv/kernel" in assert_one_line_error(completed)


def test_export_refuses_an_output_folder_under_a_file_or_among_runs(tmp_path, base_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "kd_model" / "backbone").mkdir(parents=True)
    (tmp_path / "kd_model" / "backbone" / "config.json").write_text("{}")
    for out_dir, expected in ((tmp_path / "a_file" / "sub", "which is a file"),
                              (tmp_path / "kd_model", "holds other runs in its subfolders (backbone)")):
        completed = run_in_process("export_model.py", "--model_path", base_path, "--dataset", "sample",
                                   "--out_dir", out_dir, check=False)
        assert expected in assert_one_line_error(completed)
    assert os.listdir(tmp_path / "kd_model") == ["backbone"]


def test_plot_refuses_outputs_it_cannot_write_and_histories_that_are_not(tmp_path):
    history = tmp_path / "history.json"
    history.write_text(json.dumps({"train_loss": [1.0, 0.9], "val_loss": [1.1, 1.0]}))
    (tmp_path / "a_file").write_text("x")
    for flags, expected in ((["--history_path", history, "--out", tmp_path / "out.xyz"], "name a .png"),
                            (["--history_path", history, "--out", tmp_path], "name a .png"),
                            (["--history_path", history, "--out", tmp_path / "folder.png"], None),
                            (["--figures", "--images_dir", tmp_path / "a_file"], "exists and is not a folder"),
                            (["--figures", "--table", tmp_path, "--images_dir", tmp_path / "images"], "is a folder")):
        if expected is None:  # a folder named like an image
            (tmp_path / "folder.png").mkdir()
            expected = "is a folder"
        completed = run_in_process("plot_train_history.py", *flags, check=False)
        assert expected in assert_one_line_error(completed), flags
    assert not (tmp_path / "images").exists()
    for bad in ({"train_loss": ["a", "b"], "val_loss": [1.0, 1.0]}, {"train_loss": [1.0], "train_acc": 5}):
        history.write_text(json.dumps(bad))
        completed = run_in_process("plot_train_history.py", "--history_path", history, check=False)
        assert "is not a list of numbers" in assert_one_line_error(completed), bad


def test_a_typo_far_from_any_history_gets_no_unrelated_suggestion(tmp_path):
    (tmp_path / "model" / "pruned_model" / "iter1").mkdir(parents=True)
    (tmp_path / "model" / "pruned_model" / "iter1" / "history.json").write_text("{}")
    assert results.nearest_history(str(tmp_path / "model" / "prued_model" / "iter1" / "history.json")).endswith(
        os.path.join("pruned_model", "iter1", "history.json"))
    assert results.nearest_history(str(tmp_path / "elsewhere" / "x" / "h.json")) is None


def test_a_batch_larger_than_the_images_costs_no_more_than_the_images():
    network = resnet.build_resnet50(resnet.width_spec(TINY_WIDTH), "cifar", 10)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    probabilities = metrics.predict_probabilities(network, images, batch_size=10**9)  # was an array of 10**9 images
    expected = network.predict(images.astype("float32"), verbose=0)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def test_batch_files_that_unpickle_to_something_else_are_a_data_error(tmp_path):
    for name in data.TRAIN_FILES + [data.TEST_FILE]:
        (tmp_path / name).write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(data.DataError, match="not a CIFAR-10 batch file"):
        data.load_cifar10(str(tmp_path))
