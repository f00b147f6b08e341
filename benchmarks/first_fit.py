"""What a stage's first `fit` costs before its first step, with and without building the training
state up front (training.build_training_state).

    python benchmarks/first_fit.py --rounds 2

Without a distribution strategy Keras creates the optimizer's slots and the compiled metrics'
variables inside the first traced training step, and TensorFlow traces a function that creates
variables twice. Every stage run and every pruning iteration pays that once per `fit`. Each
variant runs in a fresh process (tracing caches would otherwise carry over), alternating round
after round; printed: the median seconds of the first one-epoch `fit` on two batches, the second
`fit` (already traced), and how often `train_step` was traced.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys



def one_run(prebuild, stem, width):
    """In this process: build, compile, fit twice; print a JSON line of the timings."""
    import time

    import cnn_compression

    cnn_compression.setup()  # TensorFlow quietly, and the fused BatchNorm the stages run
    import numpy as np
    import tensorflow as tf

    import model as resnet
    from cnn_compression import training

    training.set_precision("float32")
    network = resnet.build_resnet50(resnet.width_spec(width), stem)
    schedule = argparse.Namespace(epoch_num=1, learning_rate=0.01, momentum=0.9, weight_decay=5e-4, label_smoothing=0.0,
                                  lr_schedule="cosine", warmup_epochs=0, step_epochs=60)
    if prebuild:
        training.compile_classifier(network, schedule, 2)
    else:  # the same compile, without building the state (as before build_training_state existed)
        original = training.build_training_state
        training.build_training_state = lambda model: None
        training.compile_classifier(network, schedule, 2)
        training.build_training_state = original
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (128, 32, 32, 3)).astype("float32")
    labels = np.eye(10, dtype="float32")[np.arange(128) % 10]
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(64)
    traces = []
    train_step = network.train_step

    def counted(data):
        traces.append(1)  # runs only while tracing
        return train_step(data)

    network.train_step = counted
    started = time.perf_counter()
    network.fit(dataset, epochs=1, verbose=0)
    first = time.perf_counter() - started
    started = time.perf_counter()
    network.fit(dataset, epochs=1, verbose=0)
    second = time.perf_counter() - started
    print(json.dumps({"first": first, "second": second, "traces": len(traces)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stem", default="cifar")
    parser.add_argument("--width", type=float, default=0.0625)
    parser.add_argument("--one_run", choices=("prebuilt", "lazy"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_run:
        one_run(args.one_run == "prebuilt", args.stem, args.width)
        return
    results = {"lazy": [], "prebuilt": []}
    for _ in range(args.rounds):
        for variant in results:
            completed = subprocess.run([sys.executable, os.path.abspath(__file__), "--one_run", variant, "--stem", args.stem,
                                        "--width", str(args.width)], capture_output=True, text=True, check=True)
            results[variant].append(json.loads(completed.stdout.strip().splitlines()[-1]))
    print(f"{args.stem} stem, width {args.width:g}, 2 batches of 64, {args.rounds} fresh processes per variant, alternating")
    print("| training state | first fit (s) | second fit (s) | train_step traced |")
    print("|---|---:|---:|---:|")
    for variant, label in (("lazy", "created in the first step (Keras' default)"), ("prebuilt", "built before fit")):
        runs = results[variant]
        print(f"| {label} | {statistics.median(r['first'] for r in runs):.1f} | "
              f"{statistics.median(r['second'] for r in runs):.2f} | {runs[-1]['traces']} |")


if __name__ == "__main__":
    main()
