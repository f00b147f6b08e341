"""plot_train_history.py (cnn_compression.figures and .results): history figures, the typo'd path of
the original README, result figures."""

import json
import os

import keras
import numpy as np
import pytest

from cnn_compression import checkpoints
from cnn_compression import figures
from cnn_compression import results
import model as resnet
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
    # One student is our ResNet50, the other any CNN (the distillation stage takes any student):
    # conv 3 -> 8 channels, 3x3, on 32x32 (221,184 MACs), pooled, dense 8 -> 10 (80 MACs).
    pixels = keras.Input((32, 32, 3))
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, padding="same", activation="relu")(pixels))
    small_cnn = keras.Model(pixels, keras.layers.Dense(10, activation="softmax")(features))
    for name, arguments, accuracy, student in (("alone", {"no_teacher": True}, 0.4, resnet.build_resnet50(resnet.width_spec(0.0625))),
                                               ("all", {"lambda1": 0.7, "lambda2": 0.3, "lambda3": 0.2}, 0.5, small_cnn)):
        folder = root / "kd_model" / name
        folder.mkdir(parents=True)
        config = {"arguments": arguments, "complete": True,
                  "results": {"test_acc": accuracy, "parameters": student.count_params(), "teacher_test_acc": 0.59}}
        (folder / "config.json").write_text(json.dumps(config))
        checkpoints.save_model(student, str(folder / "model.h5"))
    return tmp_path


def line_data(axis):
    """{label: (x, y)} of the axis' lines."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axis.get_lines()}


def test_history_figure_draws_the_history_values(tmp_path, project):
    iter1 = os.path.join(project, "model", "pruned_model", "iter1", "history.json")
    iter2 = iter1.replace("iter1", "iter2")
    with open(iter2) as handle:
        history = json.load(handle)
    history["val_loss"][0] = 100.0  # one huge early validation loss: a log scale, so the rest stays readable
    with open(iter2, "w") as handle:
        json.dump(history, handle)
    # the script: history.png beside the history
    run_script("plot_train_history.py", f"--history_path={iter1}")
    with open(os.path.join(os.path.dirname(iter1), "history.png"), "rb") as handle:
        assert handle.read(8) == PNG_SIGNATURE
    # two histories overlaid: per axis, training and validation of each, their values exactly
    overlay = str(tmp_path / "overlay.png")
    figure = figures.plot_histories([iter1, iter2], overlay)
    assert open(overlay, "rb").read(8) == PNG_SIGNATURE
    loss_axis, accuracy_axis = figure.axes
    assert figure._suptitle.get_text() == "Training history"
    assert loss_axis.get_title() == "Loss (log scale)" and loss_axis.get_yscale() == "log"
    assert accuracy_axis.get_title() == "Accuracy" and accuracy_axis.get_ylabel() == "accuracy (%)"
    for path in (iter1, iter2):
        with open(path) as handle:
            history = json.load(handle)
        label = "/".join(path.split(os.sep)[-3:-1])  # pruned_model/iterN
        epochs = list(range(1, 6))
        for axis, key, scale in ((loss_axis, "loss", 1), (accuracy_axis, "acc", 100)):
            lines = line_data(axis)
            assert len(lines) == 4
            for split, name in (("train", "training"), ("val", "validation")):
                x, y = lines[f"{label} {name}"]
                assert x == epochs
                np.testing.assert_allclose(y, np.array(history[f"{split}_{key}"]) * scale, rtol=1e-12)
    # one history: no labels of runs, its name in the title, a linear loss axis
    figure = figures.plot_histories([iter1], str(tmp_path / "one.png"))
    assert figure._suptitle.get_text() == "Training history: pruned_model/iter1"
    assert sorted(line_data(figure.axes[0])) == ["training", "validation"] and figure.axes[0].get_yscale() == "linear"


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
    # MACs of each student, ours (449,792 for width 0.0625, as model.count_macs) and any other model
    assert rows[5].endswith("| 0.45 M |") and rows[6].endswith("| 0.22 M |")
    for name in ("pruning_result.png", "apoz_heatmap.png", "accuracy_result.png", "compression_result.png"):
        with open(os.path.join(images, name), "rb") as handle:
            assert handle.read(8) == PNG_SIGNATURE, name
        assert name in completed.stdout
    with open(os.path.join(images, "3d_apoz.jpg"), "rb") as handle:
        assert handle.read(3) == JPEG_SIGNATURE


def test_result_figures_draw_the_summary_apoz_and_student_values(project, tmp_path):
    model_root = os.path.join(project, "model")
    summary, apoz = results.load_pruning(model_root)
    students = results.load_students(model_root)
    entries = summary["iterations"]

    # accuracy per iteration: four series in percent, the base's test accuracy, compression bars
    figure = figures.plot_pruning(summary, str(tmp_path / "pruning.png"))
    accuracy_axis, rate_axis = figure.axes
    lines = line_data(accuracy_axis)
    for key, label in (("val_acc_pruned", "validation, right after pruning"), ("test_acc_pruned", "test, right after pruning"),
                       ("val_acc", "validation, after fine-tuning"), ("test_acc", "test, after fine-tuning")):
        assert lines[label][0] == [1, 2]
        np.testing.assert_allclose(lines[label][1], [100 * entry[key] for entry in entries])
    assert lines["base model, test"][1] == [61.0, 61.0]
    assert [bar.get_height() for bar in rate_axis.patches] == [1.4, 2.1]

    # channels removed: layers by iterations, from apoz.json's "removed"
    figure = figures.plot_apoz_heatmap(apoz, str(tmp_path / "heatmap.png"))
    [image] = figure.axes[0].get_images()
    np.testing.assert_array_equal(image.get_array(), [[1, 1], [1, 2]])  # rows: iterations; columns: the two layers
    assert [label.get_text() for label in figure.axes[0].get_xticklabels()] == ["c2.1_1", "c2.1_2"]
    figure = figures.plot_apoz_bars(apoz, str(tmp_path / "bars.jpg"))
    assert figure.axes[0].get_zlabel() == "channels removed" and len(figure.axes[0].collections) == 2  # a bar row per layer

    # students against the teacher: bar heights are their test accuracies, in the variants' order
    figure = figures.plot_students(students, 0.59, str(tmp_path / "students.png"))
    axis = figure.axes[0]
    assert [label.get_text() for label in axis.get_xticklabels()] == ["student alone", "L_b + L_inter + L_adv", "teacher (pruned)"]
    np.testing.assert_allclose([bar.get_height() for bar in axis.patches], [40, 50, 59])

    # accuracy against compression: the base and the iterations as one line, a point per student
    figure = figures.plot_compression(summary, students, str(tmp_path / "compression.png"))
    axis = figure.axes[0]
    rates, accuracies = line_data(axis)["pruning iterations (fine-tuned)"]
    np.testing.assert_allclose(rates, [1.0, 1.4, 2.1])
    np.testing.assert_allclose(accuracies, [61, 59, 59])
    alone = 1_000_000 / resnet.build_resnet50(resnet.width_spec(0.0625)).count_params()
    small = 1_000_000 / (3 * 3 * 3 * 8 + 8 + 8 * 10 + 10)  # the small CNN student's 314 parameters
    points = {collection.get_label(): collection.get_offsets() for collection in axis.collections}
    assert set(points) == {"base", f"student ({alone:.1f}x): student alone, 40.00%", f"student ({small:.1f}x): L_b + L_inter + L_adv, 50.00%"}
    np.testing.assert_allclose(points["base"], [[1.0, 61.0]])
    # each student at its own compression (x nudged apart by a few percent where points would overlap)
    for label, (rate, accuracy) in {f"student ({alone:.1f}x): student alone, 40.00%": (alone, 40.0),
                                    f"student ({small:.1f}x): L_b + L_inter + L_adv, 50.00%": (small, 50.0)}.items():
        np.testing.assert_allclose(points[label][0], [rate, accuracy], rtol=0.06)
    assert axis.get_xscale() == "log"


def test_figures_without_results_say_so(tmp_path):
    line = assert_one_line_error(run_in_process("plot_train_history.py", "--figures", "--model_root", tmp_path))
    assert "nothing to draw" in line
