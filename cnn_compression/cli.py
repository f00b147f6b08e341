"""The command line of every stage: flags and their validation, and clean failures.

Bad input raises `UserError` (or the data's and model's own error types); `run` turns it into one
line on stderr and exit code 2. Nothing here imports TensorFlow until the flags have parsed.
"""

import argparse
import contextlib
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter off stderr
from cnn_compression import onednn  # noqa: E402,F401  (oneDNN on before TensorFlow loads)
from cnn_compression.errors import UserError  # noqa: E402  (scripts raise it as cli.UserError)


# ---------------------------------------------------------------------------------------------
# Flags


class Arguments(argparse.Namespace):
    """Parsed flags that also name, outside vars() (which config.json stores), the flags given a value
    other than their default: a run made before a flag existed had its default, so only those make
    a resume another run (`stages.changed_arguments`)."""

    __slots__ = ("off_default",)


def _default_value(action):
    # argparse passes a string default through the flag's type, as if it had been given
    if isinstance(action.default, str) and callable(action.type):
        try:
            return action.type(action.default)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            pass  # a type that only checks given values: keep the default as written
    return action.default


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump) and exit 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, Arguments() if namespace is None else namespace)
        if isinstance(parsed, Arguments):
            # Taken as parsed, before a stage resolves any value (e.g. --precision auto).
            parsed.off_default = frozenset(action.dest for action in self._actions if action.default is not argparse.SUPPRESS
                                           and getattr(parsed, action.dest) != _default_value(action))
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
    group.add_argument("--momentum", type=lambda text: number(text, minimum=0, maximum=1), default=0.9)
    group.add_argument("--weight_decay", type=non_negative_float, default=5e-4,
                       help="decoupled weight decay of conv and dense kernels (the original used none)")
    group.add_argument("--label_smoothing", type=fraction_or_zero, default=0.0)
    group.add_argument("--lr_schedule", choices=("cosine", "step"), default="cosine",
                       help="cosine: warm-up then cosine decay; step: x0.1 every --step_epochs (the original's)")
    group.add_argument("--step_epochs", type=positive_int, default=60)
    group.add_argument("--warmup_epochs", type=non_negative_int, default=1)
    group.add_argument("--patience", type=non_negative_int, default=patience,
                       help="stop when validation accuracy has not improved for this many epochs (0 or unset: never)")
    group.add_argument("--precision", choices=("auto", "float32", "mixed_bfloat16", "mixed_float16"), default="auto",
                       help="auto: mixed_bfloat16 where the hardware computes bfloat16 natively (CPUs with AMX or "
                            "AVX512-BF16, GPUs of compute capability 8.0+), else float32; mixed_float16 (with loss "
                            "scaling) for older GPUs. Saved models are float32 either way")
    group.add_argument("--verbose", type=non_negative_int, default=1, help="Keras fit verbosity (0, 1 or 2)")
    group.add_argument("--tensorboard", type=tensorboard_folder, default=None, metavar="DIR",
                       help="also write TensorBoard logs (keras.callbacks.TensorBoard) under DIR, one folder per fit")
    group.add_argument("--distribute", choices=("none", "mirrored", "multi_worker"), default="none",
                       help="mirrored: data-parallel training on every local GPU (tf.distribute.MirroredStrategy); "
                            "multi_worker: across machines (MultiWorkerMirroredStrategy, from each worker's TF_CONFIG); "
                            "--batch_size is the global batch")
    group.add_argument("--cpu_devices", type=positive_int, default=1,
                       help="split the CPU into this many logical devices (to run --distribute mirrored without GPUs)")
    return group


def tensorboard_folder(text):
    """--tensorboard's folder; TensorFlow writes the logs only with the tensorboard package installed."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise argparse.ArgumentTypeError("needs the tensorboard package (pip install tensorboard)")
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return text


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
    """Import TensorFlow and Keras without the C++ start-up lines it writes to stderr on every run.

    Only the import: `cnn_compression.setup()` does this and installs the fused BatchNorm."""
    with silenced_stderr():
        import absl.logging
        import keras  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices()  # the CUDA probe logs on first use
        absl.logging.set_verbosity(absl.logging.ERROR)  # Keras' "HDF5 is legacy" notice on every save
        tf.get_logger().setLevel("ERROR")  # "triggered tf.function retracing": expected when stages build new models


def run(main):
    """Run a script's `main()`: bad input becomes one line on stderr and exit code 2."""
    prog = os.path.basename(sys.argv[0])
    try:
        main()
    except Exception as error:
        if not isinstance(error, UserError):
            raise
        sys.stderr.write(f"{prog}: error: {error}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted; rerun the same command to resume\n")
        sys.exit(130)
