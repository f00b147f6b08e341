"""plot_train_history.py --verify: every results-table row whose model is saved is reloaded with
plain Keras and must give the row's test accuracy, measured here against numpy's argmax of
`predict`; a row without its model, or with a different model than its run used, is not checked."""

import json

import numpy as np
import pytest

from cnn_compression import checkpoints
from cnn_compression import data
from cnn_compression import files
from cnn_compression import training
from conftest import assert_one_line_error, pixel_classifier, run_in_process


def reference_accuracy(network, x_test, y_test):
    predicted = np.argmax(network.predict(x_test.astype("float32"), batch_size=100, verbose=0), axis=1)
    return float(np.mean(predicted == y_test.reshape(-1)))


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    """A results root measured on the bundled sample (500 test images): a base, a pruning run whose
    iteration 1 kept its model.h5 and iteration 2 did not, and a distilled student. Returns (root,
    {row name: the model's true test accuracy})."""
    root = tmp_path_factory.mktemp("verify") / "model"
    _, _, x_test, y_test = data.load_sample()
    accuracies = {}
    paths = {"base": root / "base_model" / "model.h5", "pruned, iteration 1": root / "pruned_model" / "iter1" / "model.h5",
             "student, L_b": root / "kd_model" / "backbone" / "model.h5"}
    for seed, (name, path) in enumerate(paths.items()):
        training.set_seed(seed)  # different weights, so a swapped file would show
        network = pixel_classifier()
        checkpoints.save_model(network, str(path))
        accuracies[name] = reference_accuracy(network, x_test, y_test)
    (root / "pruned_model" / "iter2").mkdir()
    iterations = [{"iteration": k, "parameters": 1000 // k, "macs": 1e6 / k, "compression_rate": float(k), "val_acc": 0.5,
                   "test_acc": accuracies["pruned, iteration 1"] if k == 1 else 0.11} for k in (1, 2)]
    summary = {"base": {"model_path": str(paths["base"]), "parameters": 1000, "macs": 1e6, "val_acc": 0.5,
                        "test_acc": accuracies["base"], "test_images": 500},
               "iterations": iterations, "arguments": {"dataset": "sample"}}
    (root / "pruned_model" / "summary.json").write_text(json.dumps(summary))
    (root / "pruned_model" / "config.json").write_text(json.dumps(
        {"inputs": {"base_model": files.fingerprint_file(str(paths["base"]))}}))
    student = {"arguments": {"dataset": "sample", "lambda1": 0.7}, "complete": True,
               "results": {"test_acc": accuracies["student, L_b"], "best_val_acc": 0.5, "parameters": 500, "test_images": 500}}
    (root / "kd_model" / "backbone" / "config.json").write_text(json.dumps(student))
    assert len(set(accuracies.values())) == len(accuracies)  # distinct, or a swapped file would pass
    return root, accuracies


def set_student_accuracy(root, value):
    path = root / "kd_model" / "backbone" / "config.json"
    config = json.loads(path.read_text())
    config["results"]["test_acc"] = value
    path.write_text(json.dumps(config))


def test_every_saved_model_gives_its_row(model_root):
    root, accuracies = model_root
    completed = run_in_process("plot_train_history.py", "--verify", "--model_root", root)
    lines = completed.stdout.splitlines()
    assert "pruned, iteration 2: no saved model at hand, not checked" in lines
    for name, accuracy in accuracies.items():
        [line] = [line for line in lines if line.startswith(f"{name}: ")]
        assert line.endswith(f"gives {100 * accuracy:.2f}% with plain Keras, recorded {100 * accuracy:.2f}%"), line


def test_a_model_that_does_not_give_its_row_fails_after_every_model_is_measured(model_root):
    root, accuracies = model_root
    set_student_accuracy(root, accuracies["student, L_b"] + 0.01)  # 5 images of 500
    try:
        completed = run_in_process("plot_train_history.py", "--verify", "--model_root", root, check=False)
    finally:
        set_student_accuracy(root, accuracies["student, L_b"])
    error = assert_one_line_error(completed)
    assert "1 of 3 saved models do not give their recorded test accuracy: student, L_b" in error
    assert sum(" with plain Keras, recorded " in line for line in completed.stdout.splitlines()) == 3


def test_a_base_file_other_than_the_one_the_run_pruned_is_not_checked(model_root, tmp_path):
    """The run's config.json fingerprints the base it pruned: another file at that path (a base
    retrained since) is not that row's model."""
    root, _ = model_root
    config_path = root / "pruned_model" / "config.json"
    saved = config_path.read_text()
    config_path.write_text(json.dumps({"inputs": {"base_model": "0" * 32}}))
    try:
        completed = run_in_process("plot_train_history.py", "--verify", "--model_root", root)
    finally:
        config_path.write_text(saved)
    assert "base: no saved model at hand, not checked" in completed.stdout.splitlines()


def test_bad_input_is_one_line(model_root, tmp_path):
    root, _ = model_root
    error = assert_one_line_error(run_in_process("plot_train_history.py", "--verify", "--model_root", tmp_path / "empty", check=False))
    assert "no results under" in error
    error = assert_one_line_error(run_in_process("plot_train_history.py", "--verify", "--table", tmp_path / "t.md",
                                                 "--model_root", root, check=False))
    assert "--table goes with one of --figures or --compare" in error
    assert not (tmp_path / "t.md").exists()


def test_a_row_measured_on_other_images_is_refused(model_root):
    root, _ = model_root
    summary_path = root / "pruned_model" / "summary.json"
    saved = summary_path.read_text()
    summary = json.loads(saved)
    summary["base"]["test_images"] = 10000
    summary_path.write_text(json.dumps(summary))
    try:
        completed = run_in_process("plot_train_history.py", "--verify", "--model_root", root, check=False)
    finally:
        summary_path.write_text(saved)
    assert "base was measured on 10,000 test images, this test set has 500" in assert_one_line_error(completed)
