"""SIGKILL real stage runs at every phase, rerun the same command: each rerun resumes where the
last good state was, the files stay whole, and a finished fit is never trained again."""

import json
import os

import keras
import numpy as np
import pytest

from cnn_compression import checkpoints
from cnn_compression import files
from cnn_compression import training
from conftest import assert_files_whole, kill_when, model_arrays, run_in_process, temporaries


def epochs_recorded(folder):
    return len(files.read_history(os.path.join(folder, "history.json")).get("train_loss", []))


def read_files(folder, names):
    return {name: open(os.path.join(folder, name), "rb").read() for name in names}


def kill_at_every_phase(arguments, folder, epochs):
    """Kill a fitting stage run before its first epoch, mid-write (or at the latest after epoch 1),
    after epoch 2 and after its fit, before the test evaluation closes the stage; check the files
    after each kill. Returns model.h5 and history.json as they were at the last kill."""
    kill_when(arguments, lambda: os.path.exists(os.path.join(folder, "config.json")))
    assert not os.path.exists(os.path.join(folder, "model.h5"))  # nothing usable yet: the rerun starts over
    kill_when(arguments, lambda: temporaries(folder) or epochs_recorded(folder) >= 1)
    assert_files_whole(folder)
    kill_when(arguments, lambda: epochs_recorded(folder) >= 2)
    assert_files_whole(folder)
    assert keras.models.load_model(os.path.join(folder, "model.h5"), compile=False)  # the last good checkpoint
    kill_when(arguments, lambda: os.path.exists(os.path.join(folder, "backup", training.FIT_FINISHED)))
    assert_files_whole(folder)
    assert epochs_recorded(folder) == epochs
    return read_files(folder, ["model.h5", "history.json"])


def assert_trained_as_uninterrupted(arguments, folder, uninterrupted):
    """Run `arguments` once more, uninterrupted, into the folder `uninterrupted`: the killed and
    resumed run in `folder` trained exactly as it did (same batches, same crops), so the same
    numbers to the bit; its epoch 1 was trained by a fresh process too. The history holds every
    epoch's losses (the last val_loss measures the final weights); model.h5 is the best epoch's."""
    run_in_process(*[uninterrupted if argument == folder else argument for argument in arguments])
    assert open(os.path.join(uninterrupted, "history.json"), "rb").read() == open(os.path.join(folder, "history.json"), "rb").read()
    expected, resumed = (model_arrays(os.path.join(f, "model.h5")) for f in (uninterrupted, folder))
    assert expected.keys() == resumed.keys() and all(np.array_equal(expected[name], resumed[name]) for name in expected)
    assert (json.load(open(os.path.join(uninterrupted, "config.json")))["results"]["test_acc"]
            == json.load(open(os.path.join(folder, "config.json")))["results"]["test_acc"])


def test_base_training_resumes_after_sigkill_at_every_phase_with_whole_files(tmp_path, data_flags):
    folder = str(tmp_path / "base_model")
    arguments = ["train_base_model.py", "--save_folder", folder, "--width", "0.0625", "--train_size", "256",
                 "--epoch_num", "3", "--batch_size", "64", "--warmup_epochs", "0", "--verbose", "0", *data_flags]
    fitted = kill_at_every_phase(arguments, folder, epochs=3)
    completed = run_in_process(*arguments)
    assert "resuming" in completed.stdout
    # Killed after the fit: the rerun only evaluated and closed, it did not train again. (That the
    # resumed epochs train as uninterrupted ones, to the bit, after a real SIGKILL: prune_model.py's
    # fine-tuning, the same fit_stage and pipeline, in test_prune_any_model.py; the distillation
    # stage's below, under make test-all.)
    assert read_files(folder, ["model.h5", "history.json"]) == fitted
    history = json.load(open(os.path.join(folder, "history.json")))
    assert all(len(history[key]) == 3 for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"))
    # The schedule continued across the kills: cosine decay per step over 3 epochs of 4 steps.
    schedule = keras.optimizers.schedules.CosineDecay(0.01, decay_steps=12)
    expected = [float(schedule(4 * (epoch + 1))) for epoch in range(3)]
    assert history["lr"] == pytest.approx(expected, abs=1e-7)
    assert sorted(os.listdir(folder)) == ["config.json", "history.json", "model.h5"]  # no backup, no temporaries
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["complete"] and config["results"]["best_val_acc"] == max(history["val_acc"])


def tiny_network():
    """A convolution, BatchNorm and a softmax classifier: a few seconds per fit where a ResNet50
    takes tens."""
    inputs = keras.Input((32, 32, 3))
    features = keras.layers.Conv2D(8, 3, strides=2, use_bias=False)(keras.layers.Rescaling(1 / 255)(inputs))
    features = keras.layers.ReLU()(keras.layers.BatchNormalization()(features))
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="predictions")(pooled))


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    import argparse

    from cnn_compression import data

    split = data.load_split("sample", train_size=128)
    args = argparse.Namespace(epoch_num=4, learning_rate=0.01, momentum=0.9, weight_decay=0.0, label_smoothing=0.0,
                              lr_schedule="cosine", warmup_epochs=0, step_epochs=60, patience=None, verbose=0)
    training.set_seed(0)
    network = tiny_network()
    training.compile_classifier(network, args, steps_per_epoch=2)

    class PoisonAtSecondEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                kernel = self.model.get_layer("predictions").kernel
                kernel.assign(np.full(kernel.shape, np.nan, "float32"))

    folder = str(tmp_path / "stage")
    train = data.TrainingData(split.x_train, split.y_train, 64)
    val = data.make_dataset(split.x_val, split.y_val, 64)
    with pytest.raises(training.TrainingDiverged, match="NaN in epoch 2.*last good checkpoint"):
        training.fit_stage(network, train, val, folder, args, extra_callbacks=[PoisonAtSecondEpoch()])
    kept = keras.models.load_model(os.path.join(folder, "model.h5"), compile=False)
    assert np.isfinite(kept.get_layer("predictions").get_weights()[0]).all()
    assert not os.path.exists(os.path.join(folder, "backup"))  # a rerun must not resume from NaN weights


class Killed(Exception):
    """Stands for a SIGKILL: raised once the epoch's files and backup are written."""


def test_a_resumed_fit_stops_early_at_the_same_epoch_as_an_uninterrupted_one(tmp_path):
    """EarlyStopping's best score and wait survive a kill: the resumed fit replays them from the
    history. A learning rate of 0 keeps the validation accuracy constant, so patience 2 stops after
    3 epochs (an improvement, then two without); the kill falls after epoch 2, one epoch before
    that stop. Before the fix the resumed fit started counting afresh and ran 5 epochs."""
    import argparse

    import tensorflow as tf

    args = argparse.Namespace(epoch_num=8, learning_rate=0.0, momentum=0.9, weight_decay=0.0, label_smoothing=0.0,
                              lr_schedule="cosine", warmup_epochs=0, step_epochs=60, patience=2, verbose=0)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(32, 6)).astype("float32")
    labels = np.eye(3, dtype="float32")[rng.integers(0, 3, 32)]
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)

    class Batches:  # stands for data.TrainingData: the same two batches every epoch
        steps_per_epoch = 2

        def epochs(self, first_epoch, epoch_num):
            return batches.repeat(epoch_num - first_epoch)

    train = Batches()

    def fit(folder, extra_callbacks=()):
        training.set_seed(0)
        inputs = keras.Input((6,))
        network = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
        training.compile_classifier(network, args, steps_per_epoch=2)
        return training.fit_stage(network, train, batches, str(folder), args, extra_callbacks=extra_callbacks)

    uninterrupted = fit(tmp_path / "whole")
    assert len(uninterrupted["val_acc"]) == 3 and len(set(uninterrupted["val_acc"])) == 1

    class KillAfterEpoch2(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):  # after the recorder and the backup (fit_stage's order)
            if epoch == 1:
                raise Killed()

    with pytest.raises(Killed):
        fit(tmp_path / "killed", [KillAfterEpoch2()])
    assert epochs_recorded(str(tmp_path / "killed")) == 2
    resumed = fit(tmp_path / "killed")
    assert resumed == uninterrupted
    assert files.read_history(str(tmp_path / "killed" / "history.json")) == uninterrupted


def test_a_fit_is_a_function_of_its_seed_and_a_resumed_fit_ends_as_an_uninterrupted_one(tmp_path):
    """Two fits from the same seed end with the same weights and history, to the bit; so does a fit
    killed after epoch 1 and rerun: it trains epochs 2 and 3 on the uninterrupted fit's batches
    (before, a rebuilt pipeline restarted its shuffle and drew other crops). `tiny_network` on 64
    sample images: 3 epochs of 4 batches."""
    import argparse

    from cnn_compression import data

    split = data.load_split("sample", train_size=64)
    train = data.TrainingData(split.x_train, split.y_train, 16, seed=1)
    val = data.make_dataset(split.x_val[:32], split.y_val[:32], 16)
    args = argparse.Namespace(epoch_num=3, learning_rate=0.05, momentum=0.9, weight_decay=5e-4, label_smoothing=0.0,
                              lr_schedule="cosine", warmup_epochs=0, step_epochs=60, patience=None, verbose=0)

    def fit(folder, extra_callbacks=()):
        training.set_seed(0)
        network = tiny_network()
        training.compile_classifier(network, args, train.steps_per_epoch)
        history = training.fit_stage(network, train, val, str(folder), args, extra_callbacks=extra_callbacks)
        return history, network.get_weights()

    class KillAfterEpoch1(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):  # after the recorder and the backup (fit_stage's order)
            if epoch == 0:
                raise Killed()

    history, weights = fit(tmp_path / "first")
    again_history, again_weights = fit(tmp_path / "again")
    with pytest.raises(Killed):
        fit(tmp_path / "killed", [KillAfterEpoch1()])
    assert epochs_recorded(str(tmp_path / "killed")) == 1
    resumed_history, resumed_weights = fit(tmp_path / "killed")
    assert len(history["train_loss"]) == 3
    for other_history, other_weights in ((again_history, again_weights), (resumed_history, resumed_weights)):
        assert other_history == history
        assert all(np.array_equal(a, b) for a, b in zip(other_weights, weights, strict=True))


@pytest.mark.slow  # make test-all
def test_distillation_resumes_after_sigkill_at_every_phase_with_whole_files(tmp_path, data_flags):
    import model as resnet

    teacher = tmp_path / "iter1"
    teacher.mkdir()
    checkpoints.save_model(resnet.build_resnet50(resnet.width_spec(0.125)), str(teacher / "model.h5"))
    folder = str(tmp_path / "kd_model")
    arguments = ["knowledge_distillation.py", f"--root_folder={teacher}", "--save_folder", folder,
                 "--student_stage_widths", "4,4,8,8", "--train_size", "256", "--epoch_num", "3", "--batch_size", "64",
                 "--verbose", "0", *data_flags]
    fitted = kill_at_every_phase(arguments, folder, epochs=3)
    completed = run_in_process(*arguments)
    assert "resuming" in completed.stdout
    assert read_files(folder, ["model.h5", "history.json"]) == fitted
    history = json.load(open(os.path.join(folder, "history.json")))
    assert all(len(values) == 3 for values in history.values())
    assert sorted(os.listdir(folder)) == ["config.json", "history.json", "model.h5"]
    assert json.load(open(os.path.join(folder, "config.json")))["complete"]
    assert_trained_as_uninterrupted(arguments, folder, str(tmp_path / "uninterrupted"))
