"""prune_model.py --distill_from: each iteration's fine-tuning against a frozen teacher with the
distillation stage's backbone loss, for our ResNet50 and any functional classifier; refusals,
the alpha = 0 wiring and resuming."""

import argparse
import json

import keras
import numpy as np
import pytest

from cnn_compression import checkpoints
from cnn_compression import files
import model as resnet
import prune_model
import pruning_iteration
from cnn_compression import training
from conftest import assert_one_line_error, run_in_process
from test_prune_any_model import small_classifier

RUN_FLAGS = ["--train_size", 200, "--epoch_num", 1, "--batch_size", 100, "--verbose", 0, "--precision", "float32",
             "--prune_iter", 1, "--criterion", "fraction", "--prune_fraction", 0.25, "--importance", "l1"]


def run(*arguments):
    prune_model.main([str(argument) for argument in arguments])


def history_of(root, k=1):
    return json.loads((root / f"iter{k}" / "history.json").read_text())


# ---------------------------------------------------------------------------------------------
# The loss


def fixed_scores(kind, matrix):
    """A model of 10 inputs whose class scores are inputs @ matrix, given as logits, as a Softmax
    layer after them, or as a Dense(activation="softmax") (no logits tensor: log-probabilities)."""
    inputs = keras.Input((10,))
    constant = keras.initializers.Constant(matrix)
    if kind == "dense_softmax":
        return keras.Model(inputs, keras.layers.Dense(10, "softmax", kernel_initializer=constant)(inputs))
    logits = keras.layers.Dense(10, kernel_initializer=constant)(inputs)
    return keras.Model(inputs, keras.layers.Softmax()(logits) if kind == "softmax" else logits)


def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("student_kind, teacher_kind, alpha, temperature", [
    ("logits", "softmax", 0.5, 4.0), ("dense_softmax", "logits", 0.3, 2.0), ("softmax", "dense_softmax", 1.0, 4.0),
    ("logits", "logits", 0.0, 4.0)])
def test_the_fine_tuning_loss_is_the_distillation_stage_backbone_loss(student_kind, teacher_kind, alpha, temperature):
    """(1 - alpha) * CE + alpha * T^2 * KL(teacher || student), averaged over the batch, against
    numpy, whichever way student and teacher spell their class scores."""
    rng = np.random.default_rng(0)
    student_matrix, teacher_matrix = rng.normal(0, 1, (10, 10)), rng.normal(0, 1, (10, 10))
    student, teacher = fixed_scores(student_kind, student_matrix), fixed_scores(teacher_kind, teacher_matrix)
    inputs = rng.normal(0, 2, (16, 10)).astype("float32")
    labels = np.eye(10, dtype="float32")[rng.integers(0, 10, 16)]
    args = argparse.Namespace(distill_alpha=alpha, distill_temperature=temperature, label_smoothing=0.0, epoch_num=1,
                              learning_rate=0.01, momentum=0.9, weight_decay=0.0, lr_schedule="cosine",
                              warmup_epochs=0, step_epochs=60)
    distiller = pruning_iteration.distiller(student, teacher, args, steps_per_epoch=1)
    _, terms, _ = distiller.compute_terms(inputs, labels, training=True)
    loss = float(distiller.total_loss(terms))

    student_log_p = log_softmax(inputs.astype("float64") @ student_matrix)
    cross_entropy = -(labels * student_log_p).sum(axis=-1)
    teacher_soft = log_softmax(inputs.astype("float64") @ teacher_matrix / temperature)
    student_soft = log_softmax(inputs.astype("float64") @ student_matrix / temperature)
    kl = (np.exp(teacher_soft) * (teacher_soft - student_soft)).sum(axis=-1)
    expected = np.mean((1 - alpha) * cross_entropy + alpha * temperature**2 * kl)
    assert loss == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert float(terms["cross_entropy"]) == pytest.approx(cross_entropy.mean(), rel=1e-5, abs=1e-5)
    assert not teacher.trainable and len(distiller.student_variables()) == len(student.trainable_variables)


# ---------------------------------------------------------------------------------------------
# The stage


def distilling_classifier():
    """A hand-made CNN ending in Dense + Softmax: the teacher for small_classifier's students."""
    layers = keras.layers
    inputs = keras.Input((32, 32, 3))
    x = layers.Rescaling(1 / 255.0)(inputs)
    x = layers.Conv2D(8, 3, strides=2, activation="relu", name="teacher_conv")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Softmax()(layers.Dense(10, name="teacher_logits")(x)), name="teacher")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    training.set_seed(0)
    checkpoints.save_model(resnet.build_resnet50(resnet.width_spec(0.0625), "cifar", 10), str(folder / "resnet.h5"))
    small_classifier().save(str(folder / "logits.h5"))
    small_classifier(softmax=True).save(str(folder / "probabilities.h5"))
    distilling_classifier().save(str(folder / "teacher.h5"))
    small_classifier(classes=5).save(str(folder / "five.h5"))
    inputs = keras.Input((16, 16, 3))
    keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(inputs))).save(str(folder / "small_input.h5"))
    return folder


def test_distill_from_base_fine_tunes_our_resnet50_and_saves_a_plain_student(models, tmp_path, data_flags):
    root = tmp_path / "run"
    run("--base_model_path", models / "resnet.h5", "--root_folder", root, "--distill_from", "base", *data_flags,
        *RUN_FLAGS)
    history = history_of(root)
    assert history["train_backbone_loss"] == history["train_loss"] and len(history["train_loss"]) == 1
    assert np.isfinite(history["train_cross_entropy"]).all() and 0 <= history["val_acc"][0] <= 1
    arguments = json.loads((root / "config.json").read_text())["arguments"]
    assert (arguments["distill_from"], arguments["distill_alpha"], arguments["distill_temperature"]) == ("base", 0.5, 4.0)
    student = keras.models.load_model(str(root / "iter1" / "model.h5"), compile=False)  # plain Keras
    base = keras.models.load_model(str(models / "resnet.h5"), compile=False)
    assert [layer.name for layer in student.layers] == [layer.name for layer in base.layers]  # no teacher inside
    summary = json.loads((root / "summary.json").read_text())
    assert student.count_params() == summary["iterations"][0]["parameters"] < base.count_params()
    assert resnet.describe_model(student)[0] == summary["iterations"][0]["width_spec"]


def test_distill_from_another_classifier_fine_tunes_any_model(models, tmp_path, data_flags):
    """A Dense(activation="softmax") student (log-probabilities as logits) and a Dense + Softmax teacher."""
    root = tmp_path / "run"
    run("--base_model_path", models / "probabilities.h5", "--root_folder", root, "--distill_from",
        models / "teacher.h5", "--distill_alpha", 0.7, "--distill_temperature", 2, *data_flags, *RUN_FLAGS)
    history = history_of(root)
    assert np.isfinite(history["train_backbone_loss"]).all() and np.isfinite(history["val_loss"]).all()
    student = keras.models.load_model(str(root / "iter1" / "model.h5"), compile=False)
    base = keras.models.load_model(str(models / "probabilities.h5"), compile=False)
    assert [layer.name for layer in student.layers] == [layer.name for layer in base.layers]
    assert not any(layer.name.startswith("teacher") for layer in student.layers)
    config = json.loads((root / "config.json").read_text())
    assert config["arguments"]["distill_alpha"] == 0.7 and config["arguments"]["distill_temperature"] == 2.0
    assert config["inputs"]["teacher"] == files.fingerprint_file(str(models / "teacher.h5"))


def test_alpha_zero_trains_the_same_weights_as_no_teacher(models, tmp_path, data_flags):
    """With alpha 0 the loss is the labels' cross-entropy alone: the same seed gives the same
    fine-tuned weights as a run without --distill_from, so the Distiller adds nothing else."""
    plain, distilled = tmp_path / "plain", tmp_path / "distilled"
    run("--base_model_path", models / "logits.h5", "--root_folder", plain, *data_flags, *RUN_FLAGS, "--epoch_num", 2)
    run("--base_model_path", models / "logits.h5", "--root_folder", distilled, "--distill_from", models / "teacher.h5",
        "--distill_alpha", 0, *data_flags, *RUN_FLAGS, "--epoch_num", 2)
    weights = [keras.models.load_model(str(root / "iter1" / "model.h5"), compile=False).get_weights()
               for root in (plain, distilled)]
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, atol=1e-5)
    plain_history, distilled_history = history_of(plain), history_of(distilled)
    assert "train_backbone_loss" in distilled_history and "train_backbone_loss" not in plain_history  # the Distiller ran
    np.testing.assert_allclose(distilled_history["train_loss"], plain_history["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(distilled_history["val_acc"], plain_history["val_acc"])


@pytest.mark.parametrize("case", ["missing file", "five classes", "other input", "not HDF5", "alpha without teacher"])
def test_a_bad_teacher_is_refused_in_one_line_before_anything_is_written(case, models, tmp_path):
    root = tmp_path / "run"
    teacher = {"missing file": tmp_path / "missing.h5", "five classes": models / "five.h5",
               "other input": models / "small_input.h5", "not HDF5": tmp_path / "text.h5"}.get(case)
    (tmp_path / "text.h5").write_text("not a model\n")
    flags = ["--distill_alpha", 0.3] if teacher is None else ["--distill_from", teacher]
    completed = run_in_process("prune_model.py", "--base_model_path", models / "logits.h5", "--root_folder", root,
                               *flags, *RUN_FLAGS, check=False)
    line = assert_one_line_error(completed)
    assert {"missing file": "no teacher model (--distill_from) at", "five classes": "scores 5 classes, the base model 10",
            "other input": "takes input (None, 16, 16, 3)", "not HDF5": "is not an HDF5",
            "alpha without teacher": "need --distill_from"}[case] in line
    assert not root.exists()


class Killed(Exception):
    """Stands for a SIGKILL: raised once the epoch's files and backup are written."""


def test_a_killed_distilling_fine_tuning_resumes_and_writes_the_same_files(models, tmp_path, monkeypatch, data_flags):
    """Killed after its first epoch (history, model.h5 and the backup written), the rerun resumes the
    iteration's fine-tuning at epoch 2 through BackupAndRestore (the Distiller's weights, teacher
    included); killed again after the fit, before the iteration's record, the last rerun trains no
    more and leaves model.h5 and history.json as they were. Every epoch is the uninterrupted run's
    to the bit: the resumed fit trains epochs 2 and 3 on the same batches and crops."""
    flags = ["--base_model_path", models / "logits.h5", "--distill_from", models / "teacher.h5", *data_flags,
             *RUN_FLAGS, "--epoch_num", 3]
    run("--root_folder", tmp_path / "whole", *flags)
    fit_stage = training.fit_stage
    epochs_begun = []

    class KillAfterEpoch1(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):  # after the recorder and the backup (fit_stage's order)
            if epoch == 0:
                raise Killed()

    class Count(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            epochs_begun.append(epoch)

    def killed_after_the_fit(*arguments, **options):
        fit_stage(*arguments, **options, extra_callbacks=[Count()])
        raise Killed()

    root = tmp_path / "killed"
    for fitting in (lambda *a, **k: fit_stage(*a, **k, extra_callbacks=[KillAfterEpoch1()]), killed_after_the_fit):
        monkeypatch.setattr(training, "fit_stage", fitting)
        try:
            with pytest.raises(Killed):
                run("--root_folder", root, *flags)
        finally:
            files.release_folder_locks()
        if fitting is not killed_after_the_fit:
            assert len(history_of(root)["train_loss"]) == 1 and (root / "iter1" / "backup").is_dir()
            at_first_kill = history_of(root)
    assert epochs_begun == [1, 2]  # resumed at epoch 2, not started again
    at_kill = {name: (root / "iter1" / name).read_bytes() for name in ("model.h5", "history.json")}
    monkeypatch.setattr(training, "fit_stage", lambda *a, **k: fit_stage(*a, **k, extra_callbacks=[Count()]))
    run("--root_folder", root, *flags)
    assert epochs_begun == [1, 2]  # the finished fit was not trained again
    assert {name: (root / "iter1" / name).read_bytes() for name in at_kill} == at_kill
    whole, resumed = history_of(tmp_path / "whole"), history_of(root)
    assert all(len(values) == 3 for values in resumed.values())
    assert resumed == whole  # the schedule went on from the restored optimizer step, on the same batches
    assert {key: values[:1] for key, values in whole.items()} == at_first_kill
    weights = [keras.models.load_model(str(folder / "iter1" / "model.h5"), compile=False).get_weights()
               for folder in (tmp_path / "whole", root)]
    assert all(np.array_equal(a, b) for a, b in zip(*weights, strict=True))
    assert not (root / "iter1" / "backup").exists() and json.loads((root / "config.json").read_text())["complete"]
    summary = json.loads((root / "summary.json").read_text())
    assert [record["iteration"] for record in summary["iterations"]] == [1]
