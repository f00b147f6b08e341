"""Glue every stage shares: command-line flags, clean failures, atomic files, model loading,
compiling and fitting with the stage's checkpoint and history callbacks.
"""

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter off stderr

HISTORY_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class UserError(Exception):
    """Bad input: reported as one line on stderr with exit code 2."""


# ---------------------------------------------------------------------------------------------
# Flags


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump) and exit 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        # Only once the flags are good: a typo or --help answers at once, not after TensorFlow's import.
        import_tensorflow()
        return parsed


def number(text, kind=float, minimum=None, strictly_above=None, maximum=None):
    """Parse a finite number; tolerate the trailing comma of the original README (`--lambda1=0.7,`)."""
    cleaned = text.strip().rstrip(",")
    try:
        value = kind(cleaned)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    if minimum is not None and value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least {minimum}")
    if strictly_above is not None and value <= strictly_above:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than {strictly_above}")
    if maximum is not None and value > maximum:
        raise argparse.ArgumentTypeError(f"{text!r} must be at most {maximum}")
    return value


def positive_int(text):
    return number(text, int, minimum=1)


def non_negative_int(text):
    return number(text, int, minimum=0)


def positive_float(text):
    return number(text, float, strictly_above=0)


def non_negative_float(text):
    return number(text, float, minimum=0)


def fraction(text):
    value = number(text, float, strictly_above=0)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must lie strictly between 0 and 1")
    return value


def add_data_flags(parser, batch_size=128):
    """--dataset, --data_dir, --train_size, --seed, --batch_size: the same in every script."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=("cifar10", "sample"), default="cifar10",
                       help="cifar10: the full set (see --data_dir); sample: the small real sample bundled in sample/")
    group.add_argument("--data_dir", default=None,
                       help="a cifar-10-batches-py folder or cifar-10-python.tar.gz (else $CIFAR10_DIR, the Keras cache, download)")
    group.add_argument("--train_size", type=positive_int, default=None,
                       help="train on a stratified subset of this many training images")
    group.add_argument("--seed", type=non_negative_int, default=0, help="seed of initialisation, shuffling and subsets")
    group.add_argument("--batch_size", type=positive_int, default=batch_size)
    return group


def add_model_flags(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--stem", choices=("imagenet", "cifar"), default="imagenet",
                       help="imagenet: 7x7/2 conv + max-pool (the original's); cifar: 3x3/1 conv, no pool")
    group.add_argument("--width", type=positive_float, default=1.0, help="multiplier on every layer's filters")
    group.add_argument("--class_num", type=positive_int, default=10)
    return group


def add_training_flags(parser, epoch_num=200, learning_rate=0.01, patience=None, learning_rate_flag="--learning_rate"):
    """Optimiser and schedule flags of every stage that fine-tunes or trains.

    `learning_rate_flag` renames the SGD rate's flag (distillation's is --student_learning_rate);
    pass the parsed value to `make_optimizer(..., learning_rate=...)`.
    """
    group = parser.add_argument_group("training")
    group.add_argument("--epoch_num", type=positive_int, default=epoch_num, help="epoch ceiling")
    group.add_argument(learning_rate_flag, type=positive_float, default=learning_rate, help="peak learning rate of SGD")
    group.add_argument("--momentum", type=number, default=0.9)
    group.add_argument("--weight_decay", type=non_negative_float, default=5e-4,
                       help="decoupled weight decay of conv and dense kernels (the original used none)")
    group.add_argument("--label_smoothing", type=fraction_or_zero, default=0.0)
    group.add_argument("--lr_schedule", choices=("cosine", "step"), default="cosine",
                       help="cosine: warm-up then cosine decay; step: x0.1 every --step_epochs (the original's)")
    group.add_argument("--step_epochs", type=positive_int, default=60)
    group.add_argument("--warmup_epochs", type=non_negative_int, default=1)
    group.add_argument("--patience", type=non_negative_int, default=patience,
                       help="stop when validation accuracy has not improved for this many epochs (0 or unset: never)")
    group.add_argument("--precision", choices=("float32", "mixed_bfloat16"), default="float32",
                       help="mixed_bfloat16 computes in bfloat16 (fast on CPUs with AVX512-BF16 and on TPUs/recent GPUs)")
    group.add_argument("--verbose", type=non_negative_int, default=1, help="Keras fit verbosity (0, 1 or 2)")
    group.add_argument("--distribute", choices=("none", "mirrored"), default="none",
                       help="mirrored: data-parallel training on every local GPU (tf.distribute.MirroredStrategy); "
                            "--batch_size is the global batch")
    group.add_argument("--cpu_devices", type=positive_int, default=1,
                       help="split the CPU into this many logical devices (to run --distribute mirrored without GPUs)")
    return group


def choice_text(text):
    """A choice flag's value without the original README's stray trailing comma; pair with `choices=`."""
    return text.strip().rstrip(",")


def fraction_or_zero(text):
    value = number(text, float, minimum=0)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be below 1")
    return value


# ---------------------------------------------------------------------------------------------
# Clean failures


@contextlib.contextmanager
def silenced_stderr():
    """Hide what C++ code writes straight to file descriptor 2 (TensorFlow's start-up lines, TensorFlow
    Lite's converter and interpreter); Python exceptions still carry their messages."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow():
    """Import TensorFlow and Keras without the C++ start-up lines it writes to stderr on every run."""
    with silenced_stderr():
        import absl.logging
        import keras  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices()  # the CUDA probe logs on first use
        absl.logging.set_verbosity(absl.logging.ERROR)  # Keras' "HDF5 is legacy" notice on every save
        tf.get_logger().setLevel("ERROR")  # "triggered tf.function retracing": expected when stages build new models


def is_user_error(error):
    """Bad input rather than a bug: ours, the data's, or a model file that is not our ResNet50."""
    data, model = sys.modules.get("data"), sys.modules.get("model")  # TensorFlow-free until a script needs them
    return (isinstance(error, UserError)
            or (data is not None and isinstance(error, data.DataError))
            or (model is not None and isinstance(error, model.NotOurResNetError)))


def run(main):
    """Run a script's `main()`: bad input becomes one line on stderr and exit code 2."""
    prog = os.path.basename(sys.argv[0])
    try:
        main()
    except Exception as error:
        if not is_user_error(error):
            raise
        sys.stderr.write(f"{prog}: error: {error}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted; rerun the same command to resume\n")
        sys.exit(130)


def check_output_folder(folder):
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"output folder {folder} exists and is not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output folder {folder}: {error.strerror}") from None


# ---------------------------------------------------------------------------------------------
# Files: written whole or not at all


TEMPORARY_PREFIX = ".tmp-"  # of write_atomically's files; a kill mid-write leaves them for remove_temporaries
_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomically(path, write):
    """Call `write(temporary_path)`, then rename the result onto `path`: readers see the old file or
    the whole new one, never a partial write."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=TEMPORARY_PREFIX, suffix=suffix)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes owner-only files
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(path, payload):
    def write(temporary):
        with open(temporary, "w") as handle:
            json.dump(payload, handle, indent=2, default=_json_default)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())

    write_atomically(path, write)


def write_text(path, text):
    def write(temporary):
        with open(temporary, "w") as handle:
            handle.write(text)

    write_atomically(path, write)


def write_bytes(path, content):
    """Write `content` (bytes, e.g. a .tflite flatbuffer) to `path` atomically."""
    def write(temporary):
        with open(temporary, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())

    write_atomically(path, write)


def _json_default(value):
    if hasattr(value, "tolist"):  # numpy arrays and scalars (an array's .item() fails beyond one element)
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def read_json(path, what="file"):
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise UserError(f"no {what} at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error})") from None


def save_model(model, path):
    """Save `model` as Keras HDF5 (no optimizer state: every stage compiles afresh) atomically; the model's own compile settings stay untouched.

    (Keras 3 strips the optimizer from the compile config of the model it saves to .h5.)
    """
    compile_config = getattr(model, "_compile_config", None)
    saved = dict(compile_config.config) if compile_config is not None else None
    write_atomically(path, lambda temporary: model.save(temporary, include_optimizer=False))
    if saved is not None:
        compile_config.config = saved


def load_model(path, what="model"):
    """Open one of our `.h5` ResNet50s with plain Keras; any other file is a UserError."""
    import keras

    import model as resnet

    if not os.path.exists(path):
        raise UserError(f"no {what} at {path}")
    if os.path.isdir(path):
        raise UserError(f"{what} path {path} is a folder, not an .h5 file")
    with open(path, "rb") as handle:
        if handle.read(8) != HDF5_SIGNATURE:
            raise UserError(f"{path} is not an HDF5 (.h5) file")
    try:
        loaded = keras.models.load_model(path, compile=False)
    except Exception as error:  # h5py and Keras raise many kinds for truncated or foreign files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot open {path} as a Keras model: {reason[:200]}") from None
    try:
        resnet.describe_model(loaded)
    except resnet.NotOurResNetError as error:
        raise UserError(f"{path}: {error}") from None
    return loaded


def versions():
    import keras
    import numpy
    import tensorflow

    return {"python": platform.python_version(), "tensorflow": tensorflow.__version__,
            "keras": keras.__version__, "numpy": numpy.__version__}


def write_config(folder, args, **extra):
    write_json(os.path.join(folder, "config.json"), {"arguments": vars(args), "versions": versions(), **extra})


# ---------------------------------------------------------------------------------------------
# Training


def set_seed(seed):
    import keras

    keras.utils.set_random_seed(seed)


def distribution_strategy(args):
    """The tf.distribute strategy of --distribute: build and compile models inside its scope().

    With --distribute mirrored, MirroredStrategy replicates the model on every local GPU, or, on a
    machine without GPUs, on the --cpu_devices logical CPUs. For several machines, the same code
    runs under tf.distribute.MultiWorkerMirroredStrategy (see the README).
    """
    import tensorflow as tf

    if args.cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.cpu_devices)
        except RuntimeError:
            raise UserError("--cpu_devices must be set before TensorFlow starts; it cannot change within a run") from None
    if args.distribute == "none":
        return tf.distribute.get_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    devices = [device.name for device in (gpus or tf.config.list_logical_devices("CPU"))]
    return tf.distribute.MirroredStrategy(devices=devices)


def set_precision(policy):
    import keras

    keras.mixed_precision.set_global_policy(policy)


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


def compile_classifier(model, args, steps_per_epoch):
    import keras

    model.compile(
        optimizer=make_optimizer(args, steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=args.label_smoothing),
        metrics=["accuracy"],
    )


def current_learning_rate(optimizer):
    import keras

    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def read_history(path):
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as handle:
            history = json.load(handle)
        return history if isinstance(history, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def make_stage_recorder(folder, model_to_save=None, monitor="val_acc"):
    """A Keras callback that keeps `folder`'s history.json and best model.h5 current every epoch.

    Keys follow the original project: train_loss, train_acc, val_loss, val_acc, lr, then any
    other metric Keras logs (e.g. the distillation loss terms). On a resumed fit (see
    BackupAndRestore) the history is cut back to the epoch training resumes from, and the best
    score so far is taken from it, so a resumed run writes the same files as an uninterrupted one.
    `model_to_save` defaults to the model being fitted (distillation saves only its student).
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

    return StageRecorder()


class TrainingDiverged(UserError):
    pass


FIT_FINISHED = "fit_finished.json"


def fit_stage(model, train_data, val_data, folder, args, model_to_save=None, extra_callbacks=()):
    """`model.fit` with the stage's callbacks; resumable mid-stage through BackupAndRestore.

    Writes `folder/model.h5` (best validation accuracy) and `folder/history.json`. Returns the
    history dict. A NaN loss stops training and raises TrainingDiverged; the last good
    checkpoint stays. The backup, marked finished, stays until the caller has written its
    results and calls `discard_backup`: a kill in between never trains again.
    """
    import keras

    backup = os.path.join(folder, "backup")
    remove_temporaries(folder)
    repair_backup(folder)
    finished = os.path.join(backup, FIT_FINISHED)
    if os.path.exists(finished) and os.path.exists(os.path.join(folder, "model.h5")):
        # Killed after the fit, before the caller closed the stage: the checkpoint and history are final.
        return read_history(os.path.join(folder, "history.json"))
    recorder = make_stage_recorder(folder, model_to_save)
    # The recorder writes history.json and model.h5 before the backup records the epoch as done,
    # so a kill between the two redoes that epoch instead of losing it from the history. The
    # backup outlives the fit (delete_checkpoint=False) until the caller's results are written.
    callbacks = [recorder, keras.callbacks.BackupAndRestore(backup, double_checkpoint=True, delete_checkpoint=False),
                 keras.callbacks.TerminateOnNaN(), *extra_callbacks]
    if args.patience:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=args.patience))
    model.fit(train_data, validation_data=val_data, epochs=args.epoch_num, callbacks=callbacks,
              verbose=args.verbose, shuffle=False)  # the pipeline shuffles
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


# ---------------------------------------------------------------------------------------------
# Stage life cycle: fresh, resumed or already done

IGNORED_FOR_RESUME = ("verbose", "overwrite")


def _comparable(arguments, ignore=()):
    return {key: value for key, value in arguments.items() if key not in IGNORED_FOR_RESUME and key not in ignore}


def begin_stage(folder, args, ignore=()):
    """Decide what a stage run does with `folder`: returns "fresh", "resume" or "done".

    A folder holding a run with other arguments is never overwritten without --overwrite.
    Arguments named in `ignore` may differ on a rerun (e.g. prune_model.py's --prune_iter,
    so a finished run can be extended).
    """
    check_output_folder(folder)
    remove_temporaries(folder)
    config_path = os.path.join(folder, "config.json")
    arguments = json.loads(json.dumps(vars(args), default=str))
    previous = read_json(config_path, "config") if os.path.exists(config_path) else None
    if previous is not None and getattr(args, "overwrite", False):
        discard_backup(folder)
        for name in ("model.h5", "history.json", "config.json"):
            if os.path.exists(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
        previous = None
    if previous is not None:
        before = _comparable(previous.get("arguments", {}), ignore)
        now = _comparable(arguments, ignore)
        # A flag the stored run does not know was added later: that run used its default.
        changed = sorted(key for key in before if before[key] != now.get(key))
        if changed:
            raise UserError(
                f"{folder} holds a run with other arguments ({', '.join(changed)}); "
                "pass --overwrite to replace it or choose another folder"
            )
        if previous.get("complete"):
            discard_backup(folder)  # a kill after the stage was marked complete can leave it behind
            return "done"
        return "resume"
    write_config(folder, args, complete=False)
    return "fresh"


def end_stage(folder, args, **results):
    write_config(folder, args, complete=True, **results)


def open_stage(folder, args):
    """begin_stage for a single-model stage; None (after saying so) when the folder is already done."""
    state = begin_stage(folder, args)
    if state == "done":
        print(f"{folder} already holds a finished run with these arguments: nothing to do")
        return None
    return state


def prepare_training(args):
    """The data split, with the seed and the precision policy set: how every training stage starts."""
    import data

    split = data.load_split(args.dataset, args.data_dir, args.train_size, args.seed)
    set_seed(args.seed)
    set_precision(args.precision)
    return split


def test_loss_and_accuracy(network, test_data):
    network.compile(loss="categorical_crossentropy", metrics=["accuracy"])
    loss, accuracy = network.evaluate(test_data, verbose=0)
    return float(loss), float(accuracy)


def close_stage(folder, args, history, test_data, **extra_results):
    """Measure the stage's best checkpoint on the test set (once, after all choices were made on
    validation), mark the stage complete in config.json and drop the resume backup."""
    best = load_model(os.path.join(folder, "model.h5"))
    test_loss, test_accuracy = test_loss_and_accuracy(best, test_data)
    valid = [score for score in history["val_acc"] if score is not None]
    results = {"best_val_acc": max(valid), "best_epoch": history["val_acc"].index(max(valid)) + 1,
               "test_acc": test_accuracy, "test_loss": test_loss, **extra_results}
    end_stage(folder, args, results=results)
    discard_backup(folder)
    return results


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


def remove_temporaries(folder):
    """Delete the temporary files of writes a kill interrupted (see `write_atomically`)."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(TEMPORARY_PREFIX):
                os.remove(os.path.join(folder, name))


# ---------------------------------------------------------------------------------------------
# Pretrained weights


def load_weights_by_name(model, path):
    """Copy weights from a Keras HDF5 file (a whole model or weights only) into `model` by layer name.

    Layers whose weight shapes differ (such as a 1000-class ImageNet head) are skipped.
    Returns (layers loaded, names of layers skipped for shape).
    """
    import h5py
    import numpy as np

    if not os.path.isfile(path):
        raise UserError(f"no pretrained model at {path}")
    with open(path, "rb") as handle:
        if handle.read(8) != HDF5_SIGNATURE:
            raise UserError(f"{path} is not an HDF5 (.h5) file")
    loaded, skipped = 0, []
    try:
        with h5py.File(path, "r") as archive:
            group = archive["model_weights"] if "model_weights" in archive else archive
            if "layer_names" not in group.attrs:
                raise UserError(f"{path} holds no Keras layer weights")
            for raw_name in group.attrs["layer_names"]:
                name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
                try:
                    layer = model.get_layer(name)
                except ValueError:
                    continue
                layer_group = group[name]
                weight_names = [w.decode() if isinstance(w, bytes) else str(w) for w in layer_group.attrs.get("weight_names", [])]
                values = [np.asarray(layer_group[w]) for w in weight_names]
                if not values:
                    continue
                if [v.shape for v in values] != [tuple(w.shape) for w in layer.weights]:
                    skipped.append(name)
                    continue
                layer.set_weights(values)
                loaded += 1
    except (OSError, KeyError) as error:
        raise UserError(f"cannot read weights from {path}: {error}") from None
    if loaded == 0:
        raise UserError(f"{path} shares no layer name and shape with a ResNet50 of this project")
    return loaded, skipped
