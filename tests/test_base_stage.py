"""train_base_model.py and evaluate_model.py end to end, and their answers to bad input."""

import json
import os

import keras
import pytest

import model as resnet
from cnn_compression import checkpoints
from conftest import assert_one_line_error, run_in_process, run_script


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data_flags):
    folder = str(tmp_path_factory.mktemp("base") / "base_model")
    completed = run_in_process(
        "train_base_model.py", "--save_folder", folder, "--stem", "cifar", "--width", "0.125", "--train_size", "600",
        "--epoch_num", "6", "--batch_size", "64", "--learning_rate", "0.05", "--warmup_epochs", "0", "--verbose", "0",
        *data_flags,
    )
    return folder, completed


def test_training_writes_a_plain_keras_model_and_history(base_run):
    folder, completed = base_run
    assert sorted(os.listdir(folder)) == ["config.json", "history.json", "model.h5"]  # backup removed
    history = json.load(open(os.path.join(folder, "history.json")))
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert len(history[key]) == 6, key
    assert max(history["train_acc"]) > 0.15  # ten classes: chance is 0.10
    network = keras.models.load_model(os.path.join(folder, "model.h5"))  # plain Keras
    spec, stem, class_num, _ = resnet.describe_model(network)
    assert spec == resnet.width_spec(0.125) and stem == "cifar" and class_num == 10
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["complete"] and config["arguments"]["width"] == 0.125
    assert config["results"]["best_val_acc"] == max(history["val_acc"])
    assert "tensorflow" in config["versions"]
    # it learned: the best checkpoint's accuracy on the 500 test images above chance (0.10, one standard
    # error 0.013). Runs of this fixture measured 0.174, 0.174 and 0.19 (the random crops differ between
    # runs); 0.13 is 2.2 standard errors above chance and 3.3 below those.
    assert config["results"]["test_images"] == 500 and config["results"]["test_acc"] > 0.13


def test_rerun_skips_a_finished_run_and_refuses_other_arguments(base_run, data_flags):
    folder, _ = base_run
    before = os.path.getmtime(os.path.join(folder, "model.h5"))
    again = run_in_process("train_base_model.py", "--save_folder", folder, "--stem", "cifar", "--width", "0.125", "--train_size", "600",
                       "--epoch_num", "6", "--batch_size", "64", "--learning_rate", "0.05", "--warmup_epochs", "0",
                       "--verbose", "0", *data_flags)
    assert "nothing to do" in again.stdout
    other = run_in_process("train_base_model.py", "--save_folder", folder, "--stem", "cifar", "--width", "0.25",
                           "--train_size", "600", "--epoch_num", "6", "--batch_size", "64", "--learning_rate", "0.05",
                           "--warmup_epochs", "0", "--verbose", "0", *data_flags, check=False)
    assert "width" in assert_one_line_error(other)
    assert os.path.getmtime(os.path.join(folder, "model.h5")) == before


def evaluate_small_against_base(base_run, data_flags, tmp_path, run, latency_repeats):
    folder, _ = base_run
    small = resnet.build_resnet50(resnet.width_spec(0.0625))
    small_path = str(tmp_path / "small.h5")
    checkpoints.save_model(small, small_path)
    report = str(tmp_path / "report.json")
    completed = run("evaluate_model.py", "--model_path", small_path, "--base_model_path", os.path.join(folder, "model.h5"),
                    "--latency_repeats", latency_repeats, "--json", report, *data_flags)
    assert completed.returncode == 0, completed.stderr
    result = json.load(open(report))
    # the accuracies are those of the model's own predictions (numpy argmax); one image of slack
    # for a near tie that another batching may break the other way
    import numpy as np

    from cnn_compression import data

    split = data.load_split("sample")
    for images, labels, key in ((split.x_test, split.y_test, "test_acc"), (split.x_val, split.y_val, "val_acc")):
        predicted = np.argmax(small.predict(images, batch_size=128, verbose=0), axis=-1)
        assert result[key] == pytest.approx(np.mean(predicted == labels), abs=1.01 / len(labels)), key
    assert result["parameters"] == small.count_params()
    expected_rate = resnet.parameter_count(resnet.width_spec(0.125), "cifar") / small.count_params()
    assert result["compression_rate"] == pytest.approx(expected_rate)
    assert result["mac_ratio"] > 1
    assert "compression rate" in completed.stdout and "test accuracy" in completed.stdout
    return result


def test_evaluate_reports_accuracy_size_and_compression(base_run, data_flags, tmp_path):
    result = evaluate_small_against_base(base_run, data_flags, tmp_path, run_in_process, 0)
    assert "latency_ms_batch1" not in result


@pytest.mark.slow  # make test-all: two TFLite conversions
def test_evaluate_reports_latency_and_speed_up_in_tensorflow_and_tflite(base_run, data_flags, tmp_path):
    result = evaluate_small_against_base(base_run, data_flags, tmp_path, run_script, 2)
    assert result["latency_ms_batch1"] > 0 and "speedup_batch128" in result
    assert result["tflite_latency_ms_batch128"] > 0 and "tflite_speedup_batch128" in result


def test_original_pretrained_command_trains_from_scratch_when_the_file_is_absent(tmp_path, full_data_flags):
    # The original README's command, with a small budget: no ./model/pretrained_resnet50.h5 here.
    # The one stage run on the full CIFAR-10 in CI: 5,000 validation and 10,000 test images.
    folder = str(tmp_path / "base_model")
    completed = run_in_process("train_base_model.py", f"--save_folder={folder}", "--model_path=./model/pretrained_resnet50.h5",
                           "--width", "0.0625", "--train_size", "100", "--epoch_num", "1", "--verbose", "0", *full_data_flags)
    assert "training from scratch" in completed.stderr
    assert os.path.exists(os.path.join(folder, "model.h5"))
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["results"]["test_images"] == (10000 if "--data_dir" in full_data_flags else 500)


def test_pretrained_weights_load_by_name(tmp_path):
    """A Keras 2-style full-model .h5 with a 5-class head (the script's own messages are checked
    with a Keras 3 weights file in test_output_folders.py)."""
    source = resnet.build_resnet50(resnet.width_spec(0.0625), class_num=5)
    pretrained = str(tmp_path / "pretrained.h5")
    checkpoints.save_model(source, pretrained)
    target = resnet.build_resnet50(resnet.width_spec(0.0625))
    loaded, skipped = checkpoints.load_weights_by_name(target, pretrained)
    with_weights = [layer for layer in source.layers if layer.weights]
    assert (loaded, skipped) == (len(with_weights) - 1, ["predictions"])
    for layer in with_weights[:-1]:
        for have, want in zip(target.get_layer(layer.name).get_weights(), layer.get_weights()):
            assert (have == want).all(), layer.name


def bad_h5_files(tmp_path):
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    text = tmp_path / "text.h5"
    text.write_text("not an HDF5 file")
    truncated = tmp_path / "truncated.h5"
    whole = tmp_path / "whole.h5"
    checkpoints.save_model(resnet.build_resnet50(resnet.width_spec(0.0625)), str(whole))
    truncated.write_bytes(whole.read_bytes()[:5000])
    return {"missing": str(tmp_path / "missing.h5"), "empty": str(empty), "text": str(text),
            "truncated": str(truncated), "folder": str(tmp_path)}


def test_evaluate_rejects_bad_models_in_one_line(tmp_path):
    for case, path in bad_h5_files(tmp_path).items():
        # one case in a new process (TensorFlow's start says nothing on stderr), the others in this one
        run = run_script if case == "missing" else run_in_process
        completed = run("evaluate_model.py", "--model_path", path, "--dataset", "sample", check=False)
        line = assert_one_line_error(completed)
        assert path in line or case == "missing" and "no model" in line, (case, line)


@pytest.mark.parametrize("flags, expected", [
    (["--batch_size", "0"], "--batch_size"),
    (["--width", "0"], "--width"),
    (["--width", "nan"], "--width"),
    (["--learning_rate", "-1"], "--learning_rate"),
    (["--epoch_num", "inf"], "--epoch_num"),
    (["--data_dir", "/no/such/folder"], "--data_dir"),
])
def test_train_rejects_bad_flags_in_one_line(tmp_path, flags, expected):
    completed = run_in_process("train_base_model.py", "--save_folder", str(tmp_path / "out"), "--epoch_num", "1", *flags, check=False)
    assert expected in assert_one_line_error(completed)
    assert not os.path.exists(tmp_path / "out" / "model.h5")


def test_train_rejects_an_empty_data_folder(tmp_path):
    empty = tmp_path / "cifar-10-batches-py"
    empty.mkdir()
    completed = run_in_process("train_base_model.py", "--save_folder", str(tmp_path / "out"), "--data_dir", str(empty), check=False)
    assert "holds neither" in assert_one_line_error(completed)
    assert not os.path.exists(tmp_path / "out" / "model.h5")


def test_train_rejects_an_output_folder_that_is_a_file(tmp_path):
    target = tmp_path / "occupied"
    target.write_text("keep me")
    completed = run_script("train_base_model.py", "--save_folder", str(target), "--dataset", "sample", check=False)
    assert "not a folder" in assert_one_line_error(completed)
    assert target.read_text() == "keep me"


def test_the_default_base_is_compared_only_when_it_can_be_the_models_base(tmp_path, monkeypatch, capsys):
    """The strong run's models (CIFAR stem) are not compared with ./model/base_model (ImageNet stem):
    their MAC ratio and speed-ups against it would mean nothing."""
    import evaluate_model

    cifar = resnet.build_resnet50(resnet.width_spec(0.0625), "cifar")
    imagenet_path = str(tmp_path / "imagenet.h5")
    checkpoints.save_model(resnet.build_resnet50(resnet.width_spec(0.0625), "imagenet"), imagenet_path)
    monkeypatch.setattr(evaluate_model, "DEFAULT_BASE", imagenet_path)
    assert evaluate_model.choose_base(cifar) is None
    assert f"not comparing against the default base {imagenet_path}" in capsys.readouterr().err
    monkeypatch.setattr(evaluate_model, "DEFAULT_BASE", str(tmp_path / "absent.h5"))
    assert evaluate_model.choose_base(cifar) is None
    # A base of the same stem, classes and input is compared, and a model not ours never refused.
    assert evaluate_model.base_mismatch(cifar, resnet.build_resnet50(resnet.width_spec(0.125), "cifar")) is None
    assert evaluate_model.base_mismatch(keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten()]), cifar) is None
