"""Throughput of one process against two local workers (MultiWorkerMirroredStrategy), same cores.

    python benchmarks/multi_worker_speed.py --stem cifar --width 0.25 --steps 20

Runs, in one invocation: one process on all cores (no strategy), then two workers pinned to one
core each through launch_workers.py; each trains `--steps` global batches of `--batch_size` with
`model.fit` after a warm-up, on random in-memory images, and the chief reports images/s. Also
prints what each step sends: the gradient all-reduce moves the model's parameter bytes per step.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(args):
    """Worker mode: time `args.steps` steps of fit (under the strategy when TF_CONFIG is set)."""
    import cnn_compression
    from cnn_compression import training

    cnn_compression.setup()  # TensorFlow quietly, and the fused BatchNorm the stages run
    import numpy as np
    import tensorflow as tf

    import model as resnet

    strategy = training.distribution_strategy(argparse.Namespace(
        distribute="multi_worker" if os.environ.get("TF_CONFIG") else "none", cpu_devices=1))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch_size * 4, 32, 32, 3)).astype(np.float32)
    labels = tf.one_hot(rng.integers(0, 10, len(images)), 10)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(args.batch_size).repeat()
    schedule = argparse.Namespace(epoch_num=1, learning_rate=0.01, momentum=0.9, weight_decay=5e-4, label_smoothing=0.0,
                                  lr_schedule="cosine", warmup_epochs=0, step_epochs=60)
    with strategy.scope():
        network = resnet.build_resnet50(resnet.width_spec(args.width), args.stem)
        training.compile_classifier(network, schedule, args.steps)
    network.fit(dataset, steps_per_epoch=3, epochs=1, verbose=0)
    started = time.perf_counter()
    network.fit(dataset, steps_per_epoch=args.steps, epochs=1, verbose=0)
    rate = args.steps * args.batch_size / (time.perf_counter() - started)
    print(json.dumps({"images_per_second": rate, "parameters": network.count_params()}), flush=True)


def result(text):
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stem", default="cifar")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch_size", type=int, default=128, help="global batch")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return train(args)
    flags = ["--stem", args.stem, "--width", str(args.width), "--batch_size", str(args.batch_size), "--steps", str(args.steps)]
    script = os.path.abspath(__file__)
    environment = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    single = result(subprocess.run([sys.executable, script, "--worker", *flags], env=environment, capture_output=True,
                                   text=True, check=True).stdout)
    with tempfile.TemporaryDirectory() as logs:
        code = subprocess.run([sys.executable, os.path.join(ROOT, "launch_workers.py"), "--workers", "2",
                               "--cpus_per_worker", "1", "--log_dir", logs, "--timeout", "1800", "--",
                               script, "--worker", *flags], env=environment).returncode
        if code:
            sys.exit(f"the two workers failed (exit {code}): {open(os.path.join(logs, 'worker0.log')).read()[-2000:]}")
        workers = result(open(os.path.join(logs, "worker0.log")).read())
    megabytes = single["parameters"] * 4 / 1e6
    print(f"{args.stem} stem, width {args.width:g}, global batch {args.batch_size}, {os.cpu_count()} cores:")
    print(f"  one process, all cores:          {single['images_per_second']:.0f} images/s")
    print(f"  two workers, one core each:      {workers['images_per_second']:.0f} images/s "
          f"({workers['images_per_second'] / single['images_per_second']:.2f}x)")
    print(f"  all-reduce per step: {single['parameters']:,} float32 gradients = {megabytes:.1f} MB per worker and step")


if __name__ == "__main__":
    main()
