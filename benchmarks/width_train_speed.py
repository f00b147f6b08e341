"""What do channel counts that are not multiples of 8 or 16 cost a pruned model's training and
inference in TensorFlow (oneDNN)? The base, a pruned model as pruned (its odd-width BatchNorms on
Keras' ops, cnn_compression.fused_batch_norm), the same with every BatchNorm on the fused kernel
(as before that rule), and the same architecture with every width rounded up to 8 and to 16 (what
`prune_model.py --round_to` keeps).

    python benchmarks/width_train_speed.py --base_model_path model/cifar_stem/base_model/model.h5 \\
        --model_path model/cifar_stem/pruned_taylor/iter1/model.h5 --rounds 2

Each variant runs in a fresh process, as a stage does (one model per process: several models in one
process share oneDNN's primitive cache and slow each other), in alternating rounds. Measured: a
`fit` of --steps batches of 128 after a warm-up fit (the stage's own compile: SGD, fused
BatchNorm, float32) and `predict` on the same images. Only the architecture matters (the rounded
variants get fresh weights). Printed: the median of the rounds, and the ratio to the base.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys

VARIANTS = ("base", "as pruned", "as pruned, every BatchNorm fused", "widths rounded up to 8", "widths rounded up to 16")


def build_variant(variant, base_model_path, model_path):
    from cnn_compression import checkpoints
    import model as resnet

    if variant == "base":
        return checkpoints.load_model(base_model_path, "base model")
    network = checkpoints.load_model(model_path)
    if variant.startswith("as pruned"):
        return network
    multiple = int(variant.rsplit(" ", 1)[1])
    spec = resnet.describe_model(network)[0]
    return resnet.rebuild_like(network, resnet.map_widths(spec, lambda width: int(math.ceil(width / multiple) * multiple)))


def one_run(variant, base_model_path, model_path, steps):
    """In this process: the variant's training and inference speed; prints a JSON line."""
    import time

    import cnn_compression

    cnn_compression.setup()  # TensorFlow quietly, oneDNN on, and the fused BatchNorm the stages run
    if variant == "as pruned, every BatchNorm fused":  # as before odd channel counts took Keras' path
        from cnn_compression import fused_batch_norm

        fused_batch_norm._slow_odd_channels = False
    import numpy as np
    import tensorflow as tf

    import model as resnet
    from cnn_compression import checkpoints
    from cnn_compression import training

    training.set_precision("float32")
    network = checkpoints.working_copy(build_variant(variant, base_model_path, model_path), tf.distribute.get_strategy())
    schedule = argparse.Namespace(epoch_num=1, learning_rate=0.01, momentum=0.9, weight_decay=5e-3, label_smoothing=0.1,
                                  lr_schedule="cosine", warmup_epochs=0, step_epochs=60)
    training.compile_classifier(network, schedule, steps)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (128 * steps, 32, 32, 3)).astype("float32")
    labels = np.eye(10, dtype="float32")[rng.integers(0, 10, 128 * steps)]
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(128).cache()
    network.fit(dataset.take(2), epochs=1, verbose=0)  # traces and warms oneDNN's primitives
    network.predict(images[:256], batch_size=128, verbose=0)
    started = time.perf_counter()
    network.fit(dataset, epochs=1, verbose=0)
    train = len(images) / (time.perf_counter() - started)
    started = time.perf_counter()
    network.predict(images, batch_size=128, verbose=0)
    predict = len(images) / (time.perf_counter() - started)
    print(json.dumps({"train": train, "predict": predict, "parameters": network.count_params(),
                      "macs": resnet.count_macs(network)[1]}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_model_path", default="./model/cifar_stem/base_model/model.h5")
    parser.add_argument("--model_path", required=True, help="a pruned model (our ResNet50) to compare")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="batches of 128 per timed fit")
    parser.add_argument("--one_run", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_run:
        one_run(args.one_run, args.base_model_path, args.model_path, args.steps)
        return
    results = {variant: [] for variant in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            completed = subprocess.run([sys.executable, os.path.abspath(__file__), "--one_run", variant,
                                        "--base_model_path", args.base_model_path, "--model_path", args.model_path,
                                        "--steps", str(args.steps)], capture_output=True, text=True, check=True)
            results[variant].append(json.loads(completed.stdout.strip().splitlines()[-1]))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{args.model_path} against {args.base_model_path}; {cpu}; {args.rounds} fresh processes per variant, alternating; "
          f"fit of {args.steps} batches of 128, float32")
    print("| variant | parameters | MACs | training img/s | vs base | inference img/s | vs base |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base_train = statistics.median(r["train"] for r in results["base"])
    base_predict = statistics.median(r["predict"] for r in results["base"])
    for variant, runs in results.items():
        train, predict = statistics.median(r["train"] for r in runs), statistics.median(r["predict"] for r in runs)
        print(f"| {variant} | {runs[0]['parameters']:,} | {runs[0]['macs'] / 1e6:.1f} M | {train:.0f} | {train / base_train:.2f}x | "
              f"{predict:.0f} | {predict / base_predict:.2f}x |")
        print(f"  rounds: training {[round(r['train']) for r in runs]}, inference {[round(r['predict']) for r in runs]}", file=sys.stderr)


if __name__ == "__main__":
    main()
