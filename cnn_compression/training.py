"""The training loop every stage shares: seed, precision, distribution, optimizer and schedule, and
`fit` with the stage's recorder (history.json, best model.h5) and resumable backup."""

import json
import math
import os

from cnn_compression.checkpoints import save_model
from cnn_compression.cli import UserError
from cnn_compression.files import discard_replaced, read_history, read_json, remove_temporaries, write_json

HISTORY_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")


def set_seed(seed):
    import keras

    keras.utils.set_random_seed(seed)


def distribution_strategy(args):
    """The tf.distribute strategy of --distribute: build and compile models inside its scope().

    With --distribute mirrored, MirroredStrategy replicates the model on every local GPU, or, on a
    machine without GPUs, on the --cpu_devices logical CPUs. With --distribute multi_worker,
    MultiWorkerMirroredStrategy spans the machines TF_CONFIG names (see multi_worker.py). Create it
    before any other TensorFlow work.
    """
    import tensorflow as tf

    if args.cpu_devices > 1 and args.distribute != "mirrored":  # it would be silently ignored
        raise UserError(f"--cpu_devices {args.cpu_devices} splits the CPU for --distribute mirrored, which this run "
                        f"does not use (--distribute {args.distribute}); add it or leave --cpu_devices out")
    if args.cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.cpu_devices)
        except RuntimeError:
            raise UserError("--cpu_devices must be set before TensorFlow starts; it cannot change within a run") from None
    if args.distribute == "none":
        return tf.distribute.get_strategy()
    if args.distribute == "multi_worker":
        from cnn_compression import multi_worker

        return multi_worker.make_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    devices = [device.name for device in (gpus or tf.config.list_logical_devices("CPU"))]
    return tf.distribute.MirroredStrategy(devices=devices)


PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
BFLOAT16_GPU_CAPABILITY = (8, 0)  # Ampere and newer


def native_bfloat16():
    """Whether this machine computes bfloat16 natively: every GPU of compute capability 8.0 or
    more, or (without GPUs) a CPU with AMX or AVX512-BF16."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capabilities = [tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0)) for gpu in gpus]
        return all(tuple(capability) >= BFLOAT16_GPU_CAPABILITY for capability in capabilities)
    from cnn_compression import cpu

    return cpu.native_bfloat16()


def resolve_precision(precision):
    """--precision auto becomes mixed_bfloat16 where the hardware runs bfloat16 natively, else float32."""
    if precision == "auto":
        return "mixed_bfloat16" if native_bfloat16() else "float32"
    return precision


def set_precision(precision):
    """Set Keras' global dtype policy from --precision; returns the policy's name (auto resolved).

    Models built afterwards compute in that precision with float32 variables; `checkpoints.save_model`
    still writes float32 models. mixed_float16 (for GPUs without bfloat16) gets dynamic loss scaling
    from `compile` (and from the Distiller's own train_step).
    """
    import keras

    policy = resolve_precision(precision)
    keras.mixed_precision.set_global_policy(policy)
    return policy


def scaled_for_precision(optimizer):
    """`optimizer` with dynamic loss scaling under mixed_float16 (which `compile` adds only to the
    model's own optimizer), else itself."""
    import keras

    if keras.mixed_precision.global_policy().name == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def learning_rate_schedule(args, steps_per_epoch, learning_rate=None):
    """The learning-rate schedule named by --lr_schedule, stepped per batch.

    Its peak is `learning_rate`, by default args.learning_rate.
    """
    import keras

    peak = args.learning_rate if learning_rate is None else learning_rate
    total = max(1, args.epoch_num * steps_per_epoch)
    if args.lr_schedule == "step":
        boundaries = [epoch * steps_per_epoch for epoch in range(args.step_epochs, args.epoch_num, args.step_epochs)]
        values = [peak * 0.1**index for index in range(len(boundaries) + 1)]
        if not boundaries:
            return peak
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    warmup = min(args.warmup_epochs * steps_per_epoch, total - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else peak,
        decay_steps=total - warmup,
        warmup_target=peak if warmup else None,
        warmup_steps=warmup,
    )


def make_optimizer(args, steps_per_epoch, learning_rate=None):
    """SGD (Nesterov momentum, decoupled weight decay) on the --lr_schedule peaking at `learning_rate` (default args.learning_rate)."""
    import keras

    optimizer = keras.optimizers.SGD(
        learning_rate=learning_rate_schedule(args, steps_per_epoch, learning_rate),
        momentum=args.momentum,
        nesterov=True,
        weight_decay=args.weight_decay or None,
    )
    # Decay kernels only: BatchNorm scales/shifts and biases are not regularised.
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    return optimizer


def compile_classifier(model, args, steps_per_epoch, from_logits=False):
    """Cross-entropy against one-hot labels, of class probabilities (our ResNet50's output) or,
    with `from_logits`, of logits."""
    import keras

    model.compile(
        optimizer=make_optimizer(args, steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(from_logits=from_logits, label_smoothing=args.label_smoothing),
        metrics=["accuracy"],
    )
    build_training_state(model)


def build_training_state(model):
    """Create the optimizer's slots and the compiled metrics' variables now, before `fit`.

    Without a distribution strategy Keras creates them inside the first traced training step, and
    TensorFlow traces a function that creates variables twice: for a ResNet50 that is one more
    trace of the whole forward and backward pass, ~15 s of every `fit` here (a first fit of a tiny
    ResNet50 on two batches: 27 s -> 11 s).
    """
    import numpy as np
    import tensorflow as tf

    if tf.distribute.has_strategy():
        return  # under a distribution strategy Keras builds both before tracing (_maybe_symbolic_build)
    model.optimizer.build(model.trainable_variables)
    scores = np.zeros((1, model.output_shape[-1]), np.float32)
    model.compute_metrics(None, scores, scores)  # builds the compiled metrics (accuracy), as the first step would
    model.reset_metrics()


def current_learning_rate(optimizer):
    import keras

    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def make_stage_recorder(folder, model_to_save=None, monitor="val_acc", run_folder=None):
    """A Keras callback that keeps `folder`'s history.json and best model.h5 current every epoch.

    Keys follow the original project: train_loss, train_acc, val_loss, val_acc, lr, then any
    other metric Keras logs (e.g. the distillation loss terms). On a resumed fit (see
    BackupAndRestore) the history is cut back to the epoch training resumes from, and the best
    score so far is taken from it, so a resumed run writes the same files as an uninterrupted one.
    `model_to_save` defaults to the model being fitted (distillation saves only its student).
    Once an epoch is written, the run an --overwrite set aside in `run_folder` (default `folder`)
    is deleted.
    """
    import keras

    history_path = os.path.join(folder, "history.json")
    model_path = os.path.join(folder, "model.h5")

    class StageRecorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.history = None
            self.best = -math.inf

        def on_epoch_begin(self, epoch, logs=None):
            if self.history is None:
                previous = read_history(history_path)
                self.history = {key: list(values)[:epoch] for key, values in previous.items() if isinstance(values, list)}
                scores = [s for s in self.history.get(monitor, []) if s is not None and math.isfinite(s)]
                self.best = max(scores) if scores and os.path.exists(model_path) else -math.inf

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            row = {
                "train_loss": logs.pop("loss", None),
                "train_acc": logs.pop("accuracy", None),
                "val_loss": logs.pop("val_loss", None),
                "val_acc": logs.pop("val_accuracy", None),
                "lr": current_learning_rate(self.model.optimizer),
            }
            logs.pop("learning_rate", None)
            for key, value in logs.items():
                name = key[4:] if key.startswith("val_") else key
                row[f"val_{name}" if key.startswith("val_") else f"train_{name}"] = value
            for key, value in row.items():
                self.history.setdefault(key, []).append(None if value is None else float(value))
            score = row.get(monitor)
            loss = row.get("train_loss")
            diverged = loss is None or not math.isfinite(loss)  # NaN weights can still score on validation
            if not diverged and score is not None and math.isfinite(score) and score > self.best:
                self.best = score
                save_model(model_to_save or self.model, model_path)
            write_json(history_path, self.history)
            discard_replaced(run_folder or folder)

    return StageRecorder()


def replay_early_stopping(scores):
    """(best, wait) of keras.callbacks.EarlyStopping(mode="max") after the epochs whose
    monitored `scores` (None: not measured) are given, by its own rule: every measured epoch
    counts one more wait, an improvement on the best resets it."""
    best, wait = None, 0
    for score in scores:
        if score is None:
            continue  # EarlyStopping skips an epoch without the monitored value
        wait += 1
        if best is None or score > best:  # NaN never improves, as in Keras
            best, wait = score, 0
    return best, wait


def make_early_stopping(recorder, patience, monitor="val_acc"):
    """EarlyStopping on validation accuracy whose best score and wait continue across a resume.

    Keras' EarlyStopping starts afresh at every fit, so a fit resumed by BackupAndRestore would
    stop at another epoch than an uninterrupted one. At the first epoch of a fit this one replays
    the `recorder`'s history (cut back to the epoch training resumes from) instead.
    """
    import keras

    class ResumedEarlyStopping(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            self.replayed = False

        def on_epoch_begin(self, epoch, logs=None):
            if not self.replayed:  # the recorder (earlier in the callbacks) has read the history by now
                self.replayed = True
                self.best, self.wait = replay_early_stopping((recorder.history or {}).get(monitor, [])[:epoch])

    return ResumedEarlyStopping(monitor="val_accuracy", mode="max", patience=patience)


class TrainingDiverged(UserError):
    pass


FIT_FINISHED = "fit_finished.json"


def fit_stage(model, train_data, val_data, folder, args, model_to_save=None, extra_callbacks=(), run_folder=None):
    """`model.fit` on `train_data` (a `data.TrainingData`) with the stage's callbacks; resumable
    mid-stage through BackupAndRestore, on the same batches an uninterrupted fit trains on.

    Writes `folder/model.h5` (best validation accuracy) and `folder/history.json`. Returns the
    history dict. A NaN loss stops training and raises TrainingDiverged; the last good
    checkpoint stays. The backup, marked finished, stays until the caller has written its
    results and calls `discard_backup`: a kill in between never trains again.
    """
    import keras

    backup = os.path.join(folder, "backup")
    remove_temporaries(folder)
    remove_temporaries(backup)  # the seed states' (make_seed_state_backup)
    repair_backup(folder)
    finished = os.path.join(backup, FIT_FINISHED)
    if os.path.exists(finished) and os.path.exists(os.path.join(folder, "model.h5")):
        # Killed after the fit, before the caller closed the stage: the checkpoint and history are final.
        return read_history(os.path.join(folder, "history.json"))
    first_epoch = resume_epoch(folder)
    recorder = make_stage_recorder(folder, model_to_save, run_folder=run_folder)
    # The recorder writes history.json and model.h5 before the backup records the epoch as done,
    # so a kill between the two redoes that epoch instead of losing it from the history. The
    # backup outlives the fit (delete_checkpoint=False) until the caller's results are written.
    callbacks = [recorder, make_seed_state_backup(backup, first_epoch),
                 keras.callbacks.BackupAndRestore(backup, double_checkpoint=True, delete_checkpoint=False),
                 make_first_epoch_check(first_epoch), keras.callbacks.TerminateOnNaN(), *extra_callbacks]
    if args.patience:
        callbacks.append(make_early_stopping(recorder, args.patience))
    if getattr(args, "tensorboard", None):
        # One log folder per fitted folder (a pruning run's iterations each get theirs).
        name = os.path.basename(os.path.normpath(folder))
        if run_folder:
            name = f"{os.path.basename(os.path.normpath(run_folder))}_{name}"
        callbacks.append(keras.callbacks.TensorBoard(log_dir=os.path.join(args.tensorboard, name)))
    # One stream of every epoch from the resume epoch on, cut into epochs by steps_per_epoch: Keras
    # 3.15 keeps one iterator across the epochs of a fit given steps_per_epoch (EpochIterator), so
    # epoch e trains on the batches of (seed, e) (tests/test_data.py pins this). A fit with nothing
    # left still gets one epoch's stream, never read: an empty one would fail the multi-worker build.
    stream = train_data.epochs(min(first_epoch, args.epoch_num - 1), args.epoch_num)
    model.fit(stream, steps_per_epoch=train_data.steps_per_epoch, validation_data=val_data, epochs=args.epoch_num,
              callbacks=callbacks, verbose=args.verbose, shuffle=False)  # the pipeline shuffles
    # None when the backup already held the last epoch (a kill just before the finish mark)
    history = recorder.history if recorder.history is not None else read_history(os.path.join(folder, "history.json"))
    losses = history.get("train_loss", [])
    if losses and (losses[-1] is None or not math.isfinite(losses[-1])):
        discard_backup(folder)  # it holds the NaN weights; a rerun must not resume from them
        raise TrainingDiverged(
            f"training loss became NaN in epoch {len(losses)}; lower --learning_rate. "
            f"The last good checkpoint is kept at {os.path.join(folder, 'model.h5')}"
        )
    if not os.path.exists(os.path.join(folder, "model.h5")):
        raise TrainingDiverged(f"no epoch produced a finite validation accuracy; nothing saved in {folder}")
    write_json(finished, {"epochs": len(losses)})  # a rerun before discard_backup() skips straight to the results
    return history


def resume_epoch(folder):
    """The epoch BackupAndRestore resumes `folder`'s fit at: the epoch after the last one backed up
    (Keras' training_metadata.json, once `repair_backup` has made it readable), else 0."""
    metadata = os.path.join(folder, "backup", "training_metadata.json")
    return int(read_json(metadata, "backup metadata")["epoch"]) if os.path.exists(metadata) else 0


SEED_STATES = "seed_states.json"


def make_seed_state_backup(backup, first_epoch):
    """A callback that carries the random state of the model's layers (Dropout's SeedGenerators)
    across a resume, as BackupAndRestore carries the weights.

    Keras saves no SeedGenerator state with the weights, so a resumed fit would draw the first
    epoch's dropout masks again. The states are written at each epoch's end, before the backup's
    own files, keyed by the epoch a fit resumes at: a kill in between, or `repair_backup` falling
    back to the older copy, still finds the states of the epoch the weights are from.
    """
    import keras

    path = os.path.join(backup, SEED_STATES)

    class SeedStateBackup(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.states = [v for v in self.model.variables if v.name == "seed_generator_state"]
            self.saved = read_json(path) if self.states and os.path.exists(path) else {}
            for variable, value in zip(self.states, self.saved.get(str(first_epoch), [])):
                variable.assign(value)

        def on_epoch_end(self, epoch, logs=None):
            if self.states:
                self.saved[str(epoch + 1)] = [keras.ops.convert_to_numpy(v).tolist() for v in self.states]
                write_json(path, self.saved)

    return SeedStateBackup()


def make_first_epoch_check(first_epoch):
    """A callback that fails the fit if it starts at another epoch than `first_epoch`, the one its
    training stream was built from: every epoch would then train on another epoch's batches."""
    import keras

    class FirstEpochCheck(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.checked = False

        def on_epoch_begin(self, epoch, logs=None):
            if not self.checked:
                self.checked = True
                if epoch != first_epoch:
                    raise RuntimeError(f"the fit resumed at epoch {epoch + 1}, its data at epoch {first_epoch + 1}")

    return FirstEpochCheck()


def repair_backup(folder):
    """Make `folder/backup` safe for BackupAndRestore to resume from, or remove it.

    A kill while Keras writes its checkpoint leaves a weights file it cannot open; Keras then
    raises on every rerun unless an older copy (`.bkp`, which exists only from the second epoch
    on) is readable. Fall back to that copy, else drop the backup so the fit starts afresh.
    Returns "ok", "restored", "discarded" or "none".
    """
    import h5py

    backup = os.path.join(folder, "backup")
    latest = os.path.join(backup, "latest.weights.h5")
    metadata = os.path.join(backup, "training_metadata.json")

    def readable(weights, epoch_file):
        try:
            with h5py.File(weights, "r") as archive:  # read every array: a truncated file may open
                archive.visititems(lambda name, item: item[()] if isinstance(item, h5py.Dataset) else None)
            with open(epoch_file) as handle:
                int(json.load(handle)["epoch"])
            return True
        except (OSError, ValueError, KeyError, TypeError, RuntimeError):
            return False

    if not os.path.isdir(backup):
        return "none"
    if readable(latest, metadata):
        return "ok"
    if readable(latest + ".bkp", metadata + ".bkp"):
        import shutil

        shutil.copyfile(latest + ".bkp", latest)
        shutil.copyfile(metadata + ".bkp", metadata)
        return "restored"
    discard_backup(folder)
    return "discarded"


def discard_backup(folder):
    import shutil

    shutil.rmtree(os.path.join(folder, "backup"), ignore_errors=True)
