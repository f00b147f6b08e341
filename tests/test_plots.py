"""plot_train_history.py: history figures, the typo'd path of the original README, result figures."""

import json
import os

import pytest

import model as resnet
import checkpoints
from conftest import assert_one_line_error, run_in_process, run_script

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"


def write_history(path, epochs=5):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    history = {"train_loss": [2.0 / (e + 1) for e in range(epochs)], "train_acc": [0.2 + 0.1 * e for e in range(epochs)],
               "val_loss": [2.2 / (e + 1) for e in range(epochs)], "val_acc": [0.15 + 0.1 * e for e in range(epochs)],
               "lr": [0.01] * epochs}
    with open(path, "w") as handle:
        json.dump(history, handle)


@pytest.fixture
def project(tmp_path):
    """A model/ tree like the stages write: two pruning iterations and two distillation runs."""
    root = tmp_path / "model"
    write_history(str(root / "pruned_model" / "iter1" / "history.json"))
    write_history(str(root / "pruned_model" / "iter2" / "history.json"))
    entries = []
    for iteration, rate in ((1, 1.4), (2, 2.1)):
        entries.append({"iteration": iteration, "parameters": int(1e6 / rate), "macs": 1e6, "compression_rate": rate,
                        "mac_ratio": rate, "val_acc_pruned": 0.3, "test_acc_pruned": 0.31, "val_acc": 0.6,
                        "test_acc": 0.59, "channels_removed": 10, "epochs": 2, "seconds": 1.0})
        layers = {"conv2_block1_1_relu": {"apoz": [0.1, 0.9], "kept": [0], "removed": [1], "width_before": 2, "width_after": 1},
                  "conv2_block1_2_relu": {"apoz": [0.2, 0.3, 0.95], "kept": [0, 1], "removed": [2] * iteration,
                                          "width_before": 3, "width_after": 2}}
        with open(root / "pruned_model" / f"iter{iteration}" / "apoz.json", "w") as handle:
            json.dump({"iteration": iteration, "criterion": "std", "layers": layers}, handle)
    summary = {"base": {"parameters": 1_000_000, "macs": 2e6, "val_acc": 0.62, "test_acc": 0.61}, "iterations": entries}
    with open(root / "pruned_model" / "summary.json", "w") as handle:
        json.dump(summary, handle)
    student = resnet.build_resnet50(resnet.width_spec(0.0625))
    for name, arguments, accuracy in (("alone", {"no_teacher": True}, 0.4),
                                      ("all", {"lambda1": 0.7, "lambda2": 0.3, "lambda3": 0.2}, 0.5)):
        folder = root / "kd_model" / name
        folder.mkdir(parents=True)
        config = {"arguments": arguments, "complete": True,
                  "results": {"test_acc": accuracy, "parameters": student.count_params(), "teacher_test_acc": 0.59}}
        (folder / "config.json").write_text(json.dumps(config))
        checkpoints.save_model(student, str(folder / "model.h5"))
    return tmp_path


def test_history_figure_from_a_real_history(tmp_path, project):
    history = os.path.join(project, "model", "pruned_model", "iter1", "history.json")
    run_script("plot_train_history.py", f"--history_path={history}")
    with open(os.path.join(os.path.dirname(history), "history.png"), "rb") as handle:
        assert handle.read(8) == PNG_SIGNATURE
    overlay = str(tmp_path / "overlay.png")
    run_script("plot_train_history.py", "--history_path", history, "--history_path",
               history.replace("iter1", "iter2"), "--out", overlay)
    assert os.path.getsize(overlay) > 10_000


def test_the_original_readme_typo_is_rejected_with_the_nearest_history(project):
    completed = run_in_process("plot_train_history.py", "--history_path=" +
                               os.path.join(project, "model", "prued_model", "iter1", "history.json"))
    line = assert_one_line_error(completed)
    assert "did you mean" in line and os.path.join("pruned_model", "iter1", "history.json") in line


def test_a_history_that_is_not_json_is_rejected(tmp_path):
    broken = tmp_path / "history.json"
    broken.write_text("{not json")
    assert "not valid JSON" in assert_one_line_error(run_script("plot_train_history.py", "--history_path", broken, check=False))


def test_result_figures_are_drawn_from_the_model_tree(project):
    images = os.path.join(project, "images")
    table = os.path.join(project, "results.md")
    completed = run_script("plot_train_history.py", "--figures", "--model_root", os.path.join(project, "model"),
                           "--images_dir", images, "--table", table)
    rows = open(table).read().splitlines()
    assert rows[2].startswith("| base | 61.00% | 62.00% | 1,000,000 | 1.00x |")
    assert rows[4].startswith("| pruned, iteration 2 | 59.00% |")
    assert rows[5].startswith("| student, student alone | 40.00% |") and rows[6].startswith("| student, L_b + L_inter + L_adv | 50.00% |")
    for name in ("pruning_result.png", "apoz_heatmap.png", "accuracy_result.png", "compression_result.png"):
        with open(os.path.join(images, name), "rb") as handle:
            assert handle.read(8) == PNG_SIGNATURE, name
        assert name in completed.stdout
    with open(os.path.join(images, "3d_apoz.jpg"), "rb") as handle:
        assert handle.read(3) == JPEG_SIGNATURE


def test_figures_without_results_say_so(tmp_path):
    line = assert_one_line_error(run_in_process("plot_train_history.py", "--figures", "--model_root", tmp_path))
    assert "nothing to draw" in line
