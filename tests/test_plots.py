"""plot_train_history.py (cnn_compression.figures and .results): history figures, the typo'd path of
the original README, result figures."""

import json
import os

import keras
import numpy as np
import pytest

from cnn_compression import checkpoints
from cnn_compression import figures
from cnn_compression import files
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
    write_history(str(root / "kd_model" / "all" / "history.json"), epochs=3)  # the student alone kept none
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
    run_in_process("plot_train_history.py", f"--history_path={iter1}")
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
                               os.path.join(project, "model", "prued_model", "iter1", "history.json"), check=False)
    line = assert_one_line_error(completed)
    assert "did you mean" in line and os.path.join("pruned_model", "iter1", "history.json") in line


def test_a_history_that_is_not_json_is_rejected(tmp_path):
    broken = tmp_path / "history.json"
    broken.write_text("{not json")
    assert "not valid JSON" in assert_one_line_error(run_script("plot_train_history.py", "--history_path", broken, check=False))


def test_result_figures_are_drawn_from_the_model_tree(project):
    images = os.path.join(project, "images")
    table = os.path.join(project, "results.md")
    completed = run_in_process("plot_train_history.py", "--figures", "--model_root", os.path.join(project, "model"),
                           "--images_dir", images, "--table", table)
    rows = open(table).read().splitlines()
    assert rows[2].startswith("| base | 61.00% | 62.00% | 1,000,000 | 1.00x |")
    assert rows[4].startswith("| pruned, iteration 2 | 59.00% |")
    assert rows[5].startswith("| student, student alone | 40.00% |") and rows[6].startswith("| student, L_b + L_inter + L_adv | 50.00% |")
    # MACs of each student, ours (449,792 for width 0.0625, as model.count_macs) and any other model
    assert rows[5].endswith("| 0.45 M | 67.64% at 12.82x |") and rows[6].endswith("| 0.22 M | 76.01% at 12.82x |")
    assert rows[2].endswith("| 90.34% at 1x |") and rows[4].endswith("|  |")  # no teacher recorded: no original beside it
    for name in ("pruning_result.png", "apoz_heatmap.png", "accuracy_result.png", "students_history.png", "compression_result.png"):
        with open(os.path.join(images, name), "rb") as handle:
            assert handle.read(8) == PNG_SIGNATURE, name
        assert name in completed.stdout
    with open(os.path.join(images, "3d_apoz.jpg"), "rb") as handle:
        assert handle.read(3) == JPEG_SIGNATURE


def test_result_figures_draw_the_summary_apoz_and_student_values(project, tmp_path):
    model_root = os.path.join(project, "model")
    [run] = results.load_pruning_runs(model_root)
    summary, apoz = run.summary, run.records
    assert run.name == "pruned_model" and run.suffix == "" and run.importance == "APoZ"
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

    # the students epoch by epoch: each history's accuracies in percent, validation with its best; a
    # student whose history is missing has no curve
    lines = line_data(figures.plot_student_curves(students, str(tmp_path / "curves.png")).axes[0])
    assert list(lines) == ["L_b + L_inter + L_adv, validation (best 35.00%)", "L_b + L_inter + L_adv, training"]
    np.testing.assert_allclose(lines["L_b + L_inter + L_adv, validation (best 35.00%)"], [[1, 2, 3], [15, 25, 35]])
    np.testing.assert_allclose(lines["L_b + L_inter + L_adv, training"], [[1, 2, 3], [20, 30, 40]])
    # students against the teacher: bar heights are their test accuracies, in the variants' order
    figure = figures.plot_students(students, 0.59, str(tmp_path / "students.png"))
    axis = figure.axes[0]
    assert [label.get_text() for label in axis.get_xticklabels()] == ["student alone", "L_b + L_inter + L_adv", "teacher (pruned)"]
    np.testing.assert_allclose([bar.get_height() for bar in axis.patches], [40, 50, 59])
    # beside each bar, what the original reported for that kind of model
    [reported] = [c for c in axis.collections if c.get_label() == "original project (reported)"]
    np.testing.assert_allclose(reported.get_offsets(), [[0, 67.64], [1, 76.01], [2, 85.91]])

    # accuracy against compression: the base and the iterations as one line, a point per student
    figure = figures.plot_compression([run], students, str(tmp_path / "compression.png"))
    axis = figure.axes[0]
    rates, accuracies = line_data(axis)["pruning iterations (fine-tuned)"]
    np.testing.assert_allclose(rates, [1.0, 1.4, 2.1])
    np.testing.assert_allclose(accuracies, [61, 59, 59])
    alone = 1_000_000 / resnet.build_resnet50(resnet.width_spec(0.0625)).count_params()
    small = 1_000_000 / (3 * 3 * 3 * 8 + 8 + 8 * 10 + 10)  # the small CNN student's 314 parameters
    points = {collection.get_label(): collection.get_offsets() for collection in axis.collections}
    assert set(points) == {"base", f"student ({alone:.1f}x): student alone, 40.00%", f"student ({small:.1f}x): L_b + L_inter + L_adv, 50.00%",
                           "original project (reported)"}
    # the original's headline points: base, teacher at 3.02x, best student and student alone at 12.82x
    np.testing.assert_allclose(points["original project (reported)"], [[1, 90.34], [3.02, 85.91], [12.82, 77.44], [12.82, 67.64]])
    np.testing.assert_allclose(points["base"], [[1.0, 61.0]])
    # each student at its own compression (x nudged apart by a few percent where points would overlap)
    for label, (rate, accuracy) in {f"student ({alone:.1f}x): student alone, 40.00%": (alone, 40.0),
                                    f"student ({small:.1f}x): L_b + L_inter + L_adv, 50.00%": (small, 50.0)}.items():
        np.testing.assert_allclose(points[label][0], [rate, accuracy], rtol=0.06)
    assert axis.get_xscale() == "log"


def write_pruning_run(root, name, importance, rates_and_accuracies):
    """A pruning run's summary.json and apoz.json records under root/name (one channel removed per iteration)."""
    entries = []
    for iteration, (rate, accuracy) in enumerate(rates_and_accuracies, start=1):
        entries.append({"iteration": iteration, "parameters": int(1e6 / rate), "macs": 1e6 / rate, "compression_rate": rate,
                        "mac_ratio": rate, "val_acc_pruned": 0.3, "test_acc_pruned": 0.3, "val_acc": accuracy + 0.01,
                        "test_acc": accuracy, "channels_removed": 1, "epochs": 2, "seconds": 1.0})
        (root / name / f"iter{iteration}").mkdir(parents=True)
        layers = {"conv2_block1_1_relu": {"score": [0.1, 0.9], "kept": [1], "removed": [0], "width_before": 2, "width_after": 1}}
        (root / name / f"iter{iteration}" / "apoz.json").write_text(json.dumps({"iteration": iteration, "importance": importance, "layers": layers}))
    summary = {"base": {"parameters": 1_000_000, "macs": 1e6, "val_acc": 0.93, "test_acc": 0.92},
               "iterations": entries, "arguments": {"importance": importance}}
    (root / name / "summary.json").write_text(json.dumps(summary))


def test_several_pruning_runs_and_the_teacher_are_told_apart(tmp_path):
    """The strong run's layout (model/cifar_stem/): Taylor and APoZ runs side by side, the students
    distilled from one of their iterations."""
    root = tmp_path / "model"
    write_pruning_run(root, "pruned_taylor", "taylor", [(1.5, 0.91), (3.1, 0.90)])
    write_pruning_run(root, "pruned_apoz", "apoz", [(1.6, 0.90), (3.2, 0.88)])
    student = resnet.build_resnet50(resnet.width_spec(0.0625))
    folder = root / "kd_model" / "backbone"
    folder.mkdir(parents=True)
    # paths are recorded as given on the command line, relative to where the run started
    config = {"arguments": {"root_folder": "./model/cifar_stem/pruned_taylor/iter2", "lambda1": 0.7}, "complete": True,
              "results": {"test_acc": 0.8, "best_val_acc": 0.81, "parameters": student.count_params(), "teacher_test_acc": 0.9}}
    (folder / "config.json").write_text(json.dumps(config))
    checkpoints.save_model(student, str(folder / "model.h5"))

    runs = results.load_pruning_runs(str(root))
    assert [(run.name, run.importance, run.suffix) for run in runs] == [("pruned_apoz", "APoZ", "_apoz"), ("pruned_taylor", "Taylor", "_taylor")]
    assert results.teacher_of(results.load_students(str(root)), runs) == ("pruned_taylor", 2)
    table = tmp_path / "results.md"
    completed = run_in_process("plot_train_history.py", "--figures", "--model_root", root, "--images_dir", tmp_path / "images", "--table", table)
    rows = table.read_text().splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == [
        "| base", "| pruned_apoz, iteration 1", "| pruned_apoz, iteration 2", "| pruned_taylor, iteration 1",
        "| pruned_taylor, iteration 2, the teacher", "| student, L_b"]
    assert rows[4].startswith("| pruned_taylor, iteration 2, the teacher | 90.00% | 91.00% | 322,580 | 3.10x |")
    assert rows[4].endswith("| 85.91% at 3.02x |") and rows[5].endswith("| 77.24% at 12.82x |")
    for name in ("pruning_result_taylor.png", "pruning_result_apoz.png", "apoz_heatmap_taylor.png", "3d_apoz_apoz.jpg",
                 "accuracy_result.png", "compression_result.png"):
        assert os.path.isfile(tmp_path / "images" / name) and name in completed.stdout
    assert not os.path.exists(tmp_path / "images" / "pruning_result.png")

    figure = figures.plot_pruning(runs[1].summary, str(tmp_path / "taylor.png"), runs[1].importance)
    assert figure._suptitle.get_text().startswith("Iterative Taylor pruning")
    figure = figures.plot_compression(runs, results.load_students(str(root)), str(tmp_path / "compression.png"), ("pruned_taylor", 2))
    axis = figure.axes[0]
    lines = line_data(axis)
    np.testing.assert_allclose(lines["pruned_taylor: Taylor iterations (fine-tuned)"], [[1, 1.5, 3.1], [92, 91, 90]])
    np.testing.assert_allclose(lines["pruned_apoz: APoZ iterations (fine-tuned)"], [[1, 1.6, 3.2], [92, 90, 88]])
    points = {collection.get_label(): collection.get_offsets() for collection in axis.collections}
    np.testing.assert_allclose(points["the students' teacher (pruned_taylor, iteration 2)"], [[3.1, 90]])


def test_two_students_of_one_variant_are_both_kept_and_a_base_without_test_accuracy_draws(tmp_path):
    root = tmp_path / "model"
    write_pruning_run(root, "pruned_model", "apoz", [(1.5, 0.5)])
    summary_path = root / "pruned_model" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["base"]["test_acc"] = None
    summary_path.write_text(json.dumps(summary))
    for name, accuracy in (("backbone", 0.4), ("backbone_t8", 0.45)):
        (root / "kd_model" / name).mkdir(parents=True)
        (root / "kd_model" / name / "config.json").write_text(json.dumps(
            {"arguments": {"lambda1": 0.7}, "complete": True, "results": {"test_acc": accuracy, "parameters": 1000}}))
    students = results.load_students(str(root))
    assert {name: config["results"]["test_acc"] for name, config in students.items()} == {
        "L_b": 0.4, f"L_b ({os.path.join('kd_model', 'backbone_t8')})": 0.45}
    figure = figures.plot_compression(results.load_pruning_runs(str(root)), students, str(tmp_path / "compression.png"))
    np.testing.assert_allclose(line_data(figure.axes[0])["pruning iterations (fine-tuned)"], [[1.5], [50]])


def test_figures_without_results_say_so(tmp_path):
    line = assert_one_line_error(run_in_process("plot_train_history.py", "--figures", "--model_root", tmp_path, check=False))
    assert "nothing to draw" in line


def test_a_teacher_outside_the_root_in_a_folder_of_the_same_name_is_not_marked(tmp_path):
    """The students' --root_folder names a pruned_taylor/iter2 elsewhere: its model is not this
    root's pruned_taylor/iter2/model.h5 (config.json's teacher fingerprint tells them apart)."""
    root = tmp_path / "model"
    write_pruning_run(root, "pruned_taylor", "taylor", [(1.5, 0.91), (3.1, 0.90)])
    (root / "pruned_taylor" / "iter2" / "model.h5").write_bytes(b"this root's teacher")
    (tmp_path / "other.h5").write_bytes(b"another teacher")
    folder = root / "kd_model" / "backbone"
    folder.mkdir(parents=True)
    runs = results.load_pruning_runs(str(root))
    for teacher_file, expected in ((tmp_path / "other.h5", None),
                                   (root / "pruned_taylor" / "iter2" / "model.h5", ("pruned_taylor", 2))):
        config = {"arguments": {"root_folder": "/elsewhere/pruned_taylor/iter2", "lambda1": 0.7}, "complete": True,
                  "inputs": {"teacher": files.fingerprint_file(str(teacher_file))},
                  "results": {"test_acc": 0.8, "parameters": 1000, "teacher_test_acc": 0.9}}
        (folder / "config.json").write_text(json.dumps(config))
        assert results.teacher_of(results.load_students(str(root)), runs) == expected


def test_a_pruning_run_without_finished_iterations_draws_no_line(tmp_path):
    """APoZ started, its first iteration not finished: the compression figure has the Taylor line
    only, and the base once."""
    root = tmp_path / "model"
    write_pruning_run(root, "pruned_taylor", "taylor", [(1.5, 0.91), (3.1, 0.90)])
    (root / "pruned_apoz").mkdir()
    write_pruning_run(root, "pruned_apoz", "apoz", [])
    runs = results.load_pruning_runs(str(root))
    figure = figures.plot_compression(runs, {}, str(tmp_path / "compression.png"))
    assert list(line_data(figure.axes[0])) == ["pruned_taylor: Taylor iterations (fine-tuned)"]
    assert [row[0] for row in results.results_rows(str(root), None)] == [
        "base", "pruned_taylor, iteration 1", "pruned_taylor, iteration 2"]


def test_a_run_begun_from_a_pruned_model_draws_from_that_model(tmp_path):
    """prune_model.py --start_model_path (APoZ's 3.2x model pruned on to 12.8x): the compression
    figure's line for that run starts at its start model, not at the base, and its pruning figure
    draws the start model as iteration 0 with its compression bar."""
    root = tmp_path / "model"
    write_pruning_run(root, "pruned_apoz", "apoz", [(1.6, 0.90), (3.2, 0.88)])
    write_pruning_run(root, "pruned_apoz_on", "apoz", [(6.4, 0.86), (12.8, 0.84)])
    summary_path = root / "pruned_apoz_on" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["start"] = {"parameters": 312_500, "compression_rate": 3.2, "val_acc": 0.89, "test_acc": 0.88}
    summary_path.write_text(json.dumps(summary))
    runs = results.load_pruning_runs(str(root))
    lines = line_data(figures.plot_compression(runs, {}, str(tmp_path / "compression.png")).axes[0])
    np.testing.assert_allclose(lines["pruned_apoz: APoZ iterations (fine-tuned)"], [[1, 1.6, 3.2], [92, 90, 88]])
    np.testing.assert_allclose(lines["pruned_apoz_on: APoZ iterations (fine-tuned)"], [[3.2, 6.4, 12.8], [88, 86, 84]])
    figure = figures.plot_pruning(runs[1].summary, str(tmp_path / "pruning.png"))
    accuracy_axis, rate_axis = figure.axes
    lines = line_data(accuracy_axis)
    np.testing.assert_allclose(lines["test, after fine-tuning"], [[0, 1, 2], [88, 86, 84]])
    np.testing.assert_allclose(lines["validation, after fine-tuning"], [[0, 1, 2], [89, 87, 85]])
    assert lines["test, right after pruning"][0] == [1, 2]  # the start model was not just pruned
    assert [label.get_text() for label in accuracy_axis.get_xticklabels()] == ["start", "1", "2"]
    assert [bar.get_height() for bar in rate_axis.patches] == [3.2, 6.4, 12.8]
    # the table's rows: the start model is already a row of its own run; compression against the base
    assert [row[:5] for row in results.results_rows(str(root), None)][-2:] == [
        ("pruned_apoz_on, iteration 1", 0.86, 0.87, 156_250, 6.4), ("pruned_apoz_on, iteration 2", 0.84, 0.85, 78_125, 12.8)]


def test_four_students_at_one_rate_stay_apart_and_every_label_stays_inside_the_axes(tmp_path):
    """The strong run's end: four students at ~13x beside the original's points at 12.82x, the
    compression axis ending just past them. Each student is drawn within a few percent of its rate
    and apart from the others, and no label of the original's points runs out of the axes (under the
    legend beside them)."""
    root = tmp_path / "model"
    write_pruning_run(root, "pruned_taylor", "taylor", [(1.5, 0.91), (3.0, 0.90)])
    variants = {"student_alone": {"no_teacher": True}, "backbone": {"lambda1": 0.7},
                "backbone_intermediate": {"lambda1": 0.7, "lambda2": 0.3},
                "all_three": {"lambda1": 0.7, "lambda2": 0.3, "lambda3": 0.2}}
    for index, (folder, arguments) in enumerate(variants.items()):
        (root / "kd_model" / folder).mkdir(parents=True)
        (root / "kd_model" / folder / "config.json").write_text(json.dumps(
            {"arguments": arguments, "complete": True, "results": {"test_acc": 0.75 + index / 100, "parameters": 76_923}}))
    students = results.load_students(str(root))
    figure = figures.plot_compression(results.load_pruning_runs(str(root)), students, str(tmp_path / "compression.png"))
    axis = figure.axes[0]
    rate = 1_000_000 / 76_923
    shown = sorted(collection.get_offsets()[0][0] for collection in axis.collections if collection.get_label().startswith("student"))
    assert len(shown) == 4
    np.testing.assert_allclose(shown, rate, rtol=0.08)
    assert min(b / a for a, b in zip(shown, shown[1:])) > 1.04  # apart: a marker's width on this axis
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(figure).get_renderer()
    inside = axis.get_window_extent(renderer)
    labels = [text for text in axis.texts if text.get_text().startswith(tuple(results.ORIGINAL_POINTS.values()))]
    assert len(labels) == 4
    for text in labels:
        box = text.get_window_extent(renderer)
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1, text.get_text()


def test_compare_tables_a_sweep_by_the_arguments_it_varied(tmp_path):
    sweep = tmp_path / "kd_tuning"
    common = {"root_folder": "model/pruned/iter3", "temperature": 4.0, "kd_beta": 0.9, "epoch_num": 10, "verbose": 2}
    for name, changes, best, epoch, test, complete in (
            ("t4", {}, 0.698, 10, 0.6775, True),
            ("t8", {"temperature": 8.0, "verbose": 1}, 0.6782, 9, 0.6643, True),  # verbosity is no setting
            ("beta1", {"kd_beta": 1.0}, 0.6604, 10, 0.6638, True),
            ("t2", {"temperature": 2.0, "epoch_num": 30}, 0.9, 1, 0.9, False)):  # unfinished: left out
        (sweep / name).mkdir(parents=True)
        arguments = {**common, **changes, "save_folder": str(sweep / name)}
        config = {"arguments": arguments, "complete": complete,
                  "results": {"best_val_acc": best, "best_epoch": epoch, "test_acc": test, "parameters": 115657}}
        (sweep / name / "config.json").write_text(json.dumps(config))
    (sweep / "notes").mkdir()
    (sweep / "notes" / "config.json").write_text(json.dumps({"complete": True}))  # no results: not a run
    table = tmp_path / "tuning.md"
    completed = run_in_process("plot_train_history.py", "--compare", sweep, "--table", table)
    expected = ["| run | kd_beta | temperature | best validation accuracy (epoch) | test accuracy | parameters |",
                "|---|---|---|---:|---:|---:|",
                "| beta1 | 1 | 4 | 66.04% (10) | 66.38% | 115,657 |",
                "| t4 | 0.9 | 4 | **69.80% (10)** | 67.75% | 115,657 |",
                "| t8 | 0.9 | 8 | 67.82% (9) | 66.43% | 115,657 |"]
    assert table.read_text().splitlines() == expected
    assert completed.stdout.splitlines()[-5:] == expected
    # a folder with no finished run, and one that does not exist: one line, nothing written
    for folder in (sweep / "notes", tmp_path / "missing"):
        error = assert_one_line_error(run_in_process("plot_train_history.py", "--compare", folder, "--table",
                                                     tmp_path / "other.md", check=False))
        assert f"--compare {folder}" in error
    assert not (tmp_path / "other.md").exists()
