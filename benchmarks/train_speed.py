"""Training throughput as a user pays it: the base stage's own `fit`, variant against variant.

    python benchmarks/train_speed.py                                   # every variant, both models
    python benchmarks/train_speed.py --models cifar:0.25 --rounds 2 --steps 50

Each measurement is a fresh process (oneDNN is chosen when TensorFlow loads) that builds, compiles
and fits exactly as `train_base_model.py` does (its own flags' defaults, `data.make_dataset`'s
augmenting pipeline on real CIFAR-10, validation on the 5,000-image split, `training.fit_stage`
with its checkpoint, history and backup callbacks), in ONE `fit` call of `--steps` batches an
epoch for 1 + `--epochs` epochs. The first epoch (tracing, warm-up) is dropped; the figures are
the medians of the others: training images/s (epoch start to validation start), and the whole
epoch's seconds split into training, validation and the stage's per-epoch bookkeeping (best
checkpoint, history.json, the resume backup). Variants run interleaved, round after round, so machine load
hits all alike; ratios are to the first variant of the same round.

Variants: oneDNN off/on (TF_ENABLE_ONEDNN_OPTS) x Keras' BatchNorm/the fused kernel x float32/
mixed_bfloat16 (bfloat16 only with oneDNN, where the CPU computes it natively: elsewhere
TensorFlow emulates it, far slower). The stage itself (`train_base_model.py` as a user runs it, its epochs read off
Keras' per-epoch line) runs in the same rounds for the fused variants (`--stage all`) or for the
variant a user gets by default (`--stage default`); its epoch time is printed beside the
benchmark's, and a difference over 15% is reported as a benchmark bug (exit status 1).
Inference, in the same processes: an APoZ pass, `predict` and the test measurement that closes
every stage (`metrics.loss_and_accuracy`), each on `--inference_images` test images.
"""

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from cnn_compression import cpu  # TensorFlow-free: the parent process never loads TensorFlow

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGREEMENT = 0.15  # largest relative difference between the benchmark's epoch and the stage's own
KERAS_EPOCH_LINE = re.compile(r"^\s*(\d+)/(\d+) - (\d+)s - ")  # verbose=2: steps, the epoch's whole seconds (with validation)


def model_spec(text):
    stem, width = text.split(":")
    if stem not in ("cifar", "imagenet"):
        raise argparse.ArgumentTypeError(f"unknown stem {stem!r}")
    return stem, float(width)


def variant_name(variant):
    return (f"oneDNN {'on' if variant['onednn'] else 'off'}, {'fused' if variant['fused'] else 'Keras'} BN, "
            f"{'bfloat16' if variant['precision'] == 'mixed_bfloat16' else 'float32'}")


def environment(onednn):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1" if onednn else "0", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = REPOSITORY + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ---------------------------------------------------------------------------------------------
# One measurement, in its own process


def stage_arguments(task):
    return ["--stem", task["stem"], "--width", str(task["width"]), "--train_size", str(task["steps"] * task["batch_size"]),
            "--epoch_num", str(1 + task["epochs"]), "--batch_size", str(task["batch_size"]),
            "--precision", task["precision"], "--data_dir", task["data_dir"]]


def measure(task):
    """Fit as the base stage does and time each epoch; then the inference passes. Runs in a child."""
    import cnn_compression
    import train_base_model  # its flags' defaults are the recipe a user gets
    from cnn_compression import channel_importance
    from cnn_compression import data
    from cnn_compression import fused_batch_norm
    import keras
    from cnn_compression import metrics
    import model as resnet
    from cnn_compression import onednn
    from cnn_compression import training

    args = train_base_model.parse_args(stage_arguments(task) + ["--save_folder", "unused"])  # imports TensorFlow
    cnn_compression.setup()  # as the stage's main does: the fused BatchNorm (keras_batch_norm below undoes it)
    training.set_seed(args.seed)
    args.precision = training.set_precision(args.precision)
    split = data.load_split("cifar10", args.data_dir, args.train_size, args.seed)
    train_data = data.TrainingData(split.x_train, split.y_train, args.batch_size, args.seed)
    val_data = data.make_dataset(split.x_val, split.y_val, args.batch_size)

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.train, self.validation, self.whole = [], [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_test_begin(self, logs=None):
            self.validation_started = time.perf_counter()

        def on_test_end(self, logs=None):
            self.validation_ended = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):  # after the stage's own callbacks: checkpoint, history, backup
            self.train.append(self.validation_started - self.started)
            self.validation.append(self.validation_ended - self.validation_started)
            self.whole.append(time.perf_counter() - self.started)

    timer = EpochTimer()
    path = contextlib.nullcontext() if task["fused"] else fused_batch_norm.keras_batch_norm()
    with path:  # models traced inside take this BatchNorm path
        network = resnet.build_resnet50(resnet.width_spec(args.width), args.stem, args.class_num)
        training.compile_classifier(network, args, train_data.steps_per_epoch)
        args.verbose = 0
        with tempfile.TemporaryDirectory() as folder:  # the stage's own fit: recorder, checkpoint, backup
            training.fit_stage(network, train_data, val_data, folder, args, extra_callbacks=(timer,))
        images = split.x_test[: task["inference_images"]]
        labels = split.y_test[: task["inference_images"]]
        names = resnet.inner_activation_names()  # the pruning stage's default channels
        counter = channel_importance.zero_counter(network, names)
        inference = {}
        for name, work in (("apoz", lambda: channel_importance.apoz(network, names, images, verbose=0, count=counter)),
                           ("predict", lambda: network.predict(images, batch_size=args.batch_size, verbose=0)),
                           ("test", lambda: metrics.loss_and_accuracy(network, images, labels, args.batch_size))):
            work()  # traced here, timed below
            started = time.perf_counter()
            work()
            inference[name] = time.perf_counter() - started
    images_per_epoch = len(split.y_train)
    return {"onednn": onednn.enabled(), "cpu": cpu.model_name(), "precision": args.precision,
            "train_images_per_second": statistics.median(images_per_epoch / s for s in timer.train[1:]),
            "epoch_seconds": statistics.median(timer.whole[1:]),
            "validation_seconds": statistics.median(timer.validation[1:]),
            "bookkeeping_seconds": statistics.median(w - t - v for w, t, v in zip(timer.whole[1:], timer.train[1:],
                                                                                   timer.validation[1:])),
            "inference": inference, "validation_images": len(split.y_val)}


def run_benchmark_process(task):
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", json.dumps(task)],
                            env=environment(task["onednn"]), capture_output=True, text=True, cwd=REPOSITORY)
    if result.returncode:
        raise RuntimeError(f"{variant_name(task)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_stage_process(task):
    """`train_base_model.py` as a user runs it; the median seconds of its epochs after the first."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, os.path.join(REPOSITORY, "train_base_model.py"), "--save_folder", folder,
                   "--verbose", "2", *stage_arguments(task)]
        result = subprocess.run(command, env=environment(task["onednn"]), capture_output=True, text=True, cwd=REPOSITORY)
    if result.returncode:
        raise RuntimeError(f"the stage failed ({variant_name(task)}):\n{result.stderr[-3000:]}")
    epochs = [float(m.group(3)) for m in map(KERAS_EPOCH_LINE.match, result.stdout.splitlines()) if m]
    if len(epochs) != 1 + task["epochs"]:
        raise RuntimeError(f"expected {1 + task['epochs']} epoch lines from the stage, found {len(epochs)}")
    return statistics.median(epochs[1:])


# ---------------------------------------------------------------------------------------------
# The rounds


def variants(bfloat16):
    precisions = ("float32", "mixed_bfloat16") if bfloat16 else ("float32",)
    # bfloat16 without oneDNN is TensorFlow's Eigen emulation whatever the CPU: not a variant anyone runs.
    return [{"onednn": onednn, "fused": fused, "precision": precision}
            for precision in precisions for onednn in (False, True) for fused in (False, True)
            if onednn or precision == "float32"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=model_spec, nargs="+", default=[("cifar", 0.25), ("imagenet", 1.0)],
                        help="stem:width pairs")
    parser.add_argument("--steps", type=int, default=50, help="batches per epoch (at least 50 for a steady figure)")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs after the first, per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--inference_images", type=int, default=2000)
    parser.add_argument("--data_dir", default=os.environ.get("CIFAR10_DIR", os.path.join(REPOSITORY, "..", "shared", "data",
                                                                                        "cifar-10-batches-py")))
    parser.add_argument("--bfloat16", choices=("native", "always", "never"), default="native")
    parser.add_argument("--only", nargs="*", default=None,
                        help="variant names to keep, e.g. 'oneDNN on, fused BN, float32' (default: all)")
    parser.add_argument("--stage", choices=("default", "all", "none"), default="default",
                        help="run the stage itself beside the benchmark for the default variant, every fused one, or none")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return 0
    if args.steps < 50:
        parser.error("--steps must be at least 50: shorter epochs measure set-up, not training")
    bfloat16 = args.bfloat16 == "always" or (args.bfloat16 == "native" and cpu.native_bfloat16())
    chosen = [v for v in variants(bfloat16) if args.only is None or variant_name(v) in args.only]
    default = {"onednn": True, "fused": True, "precision": "mixed_bfloat16" if cpu.native_bfloat16() else "float32"}
    staged = [v for v in chosen if v["fused"] and (args.stage == "all" or (args.stage == "default" and v == default))]
    results, stage_seconds, cpu_name = {}, {}, None
    for round_index in range(args.rounds):
        for stem, width in args.models:
            for variant in chosen:
                task = {**variant, "stem": stem, "width": width, "steps": args.steps, "epochs": args.epochs,
                        "batch_size": args.batch_size, "data_dir": args.data_dir,
                        "inference_images": args.inference_images}
                key = (stem, width, variant_name(variant))
                outcome = run_benchmark_process(task)
                cpu_name = outcome["cpu"]
                results.setdefault(key, []).append(outcome)
                line = f"round {round_index + 1}: {stem}:{width:g} {key[2]}: {outcome['train_images_per_second']:.0f} img/s"
                if variant in staged:
                    stage_seconds.setdefault(key, []).append(run_stage_process(task))
                    line += f"; epoch {outcome['epoch_seconds']:.1f} s, the stage's own {stage_seconds[key][-1]:.1f} s"
                print(line, flush=True)
    return report(args, chosen, results, stage_seconds, cpu_name)


def report(args, chosen, results, stage_seconds, cpu_name):
    disagreements = 0
    print(f"\nCPU: {cpu_name}; {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; {args.rounds} rounds of "
          f"{args.steps} steps x batch {args.batch_size} (+ 5,000 validation images) an epoch, medians\n")
    print("| model | variant | train img/s | vs first variant | epoch s (benchmark) | of which validation, "
          "bookkeeping | epoch s (the stage) | APoZ pass s | predict s | test measurement s |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for stem, width in args.models:
        reference = None
        for variant in chosen:
            key = (stem, width, variant_name(variant))
            runs = results[key]
            rate = statistics.median(r["train_images_per_second"] for r in runs)
            epoch = statistics.median(r["epoch_seconds"] for r in runs)
            reference = reference or rate
            stage = ""
            if key in stage_seconds:
                seconds = statistics.median(stage_seconds[key])
                agree = abs(seconds - epoch) / seconds <= AGREEMENT
                disagreements += not agree
                stage = f"{seconds:.1f}" + ("" if agree else " (DISAGREES: benchmark bug)")
            inference = {name: statistics.median(r["inference"][name] for r in runs) for name in ("apoz", "predict", "test")}
            parts = (f"{statistics.median(r['validation_seconds'] for r in runs):.1f}, "
                     f"{statistics.median(r['bookkeeping_seconds'] for r in runs):.1f}")
            print(f"| {stem} stem, width {width:g} | {key[2]} | {rate:.0f} | {rate / reference:.2f}x | {epoch:.1f} | {parts} | "
                  f"{stage} | {inference['apoz']:.2f} | {inference['predict']:.2f} | {inference['test']:.2f} |")
    if disagreements:
        print(f"\n{disagreements} benchmark figure(s) differ from the stage's own epoch by more than {AGREEMENT:.0%}")
    return 1 if disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
