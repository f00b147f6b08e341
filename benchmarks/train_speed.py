"""Training throughput of the shared ResNet50 through the real input pipeline, measured in one run.

    python benchmarks/train_speed.py --width 1.0 --stem imagenet --batch_size 128 --steps 40

Prints images/s and the time of one 45,000-image epoch for Keras' own BatchNormalization and for
the fused kernel training.py installs, and their ratio, so that the comparison is taken under the
same machine load. Uses random images (speed does not depend on the pixels).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import training  # noqa: E402


def throughput(network, dataset, steps, repeats):
    network.fit(dataset.take(3), epochs=1, verbose=0, shuffle=False)  # trace and warm up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        network.fit(dataset.take(steps), epochs=1, verbose=0, shuffle=False)
        best = max(best, steps / (time.perf_counter() - start))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--stem", default="imagenet")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    training.import_tensorflow()  # installs the fused BatchNorm
    import keras
    import numpy as np

    import data
    import model as resnet

    fused_call = keras.layers.BatchNormalization.call
    keras_call = fused_call.keras_call
    rng = np.random.default_rng(0)
    count = args.batch_size * (args.steps + 3)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, count)
    dataset = data.make_dataset(images, labels, args.batch_size, training=True).repeat()
    optimizer_args = argparse.Namespace(epoch_num=1, learning_rate=0.01, momentum=0.9, weight_decay=5e-4,
                                        label_smoothing=0.0, lr_schedule="cosine", warmup_epochs=0, step_epochs=60)
    results = {}
    for name, call in (("keras BatchNormalization", keras_call), ("fused BatchNormalization", fused_call)):
        keras.layers.BatchNormalization.call = call
        network = resnet.build_resnet50(resnet.width_spec(args.width), args.stem)
        training.compile_classifier(network, optimizer_args, args.steps)
        results[name] = throughput(network, dataset, args.steps, args.repeats) * args.batch_size
        print(f"{name:26s} {results[name]:7.0f} images/s   {45000 / results[name]:6.0f} s per 45,000-image epoch", flush=True)
    keras.layers.BatchNormalization.call = fused_call
    ratio = results["fused BatchNormalization"] / results["keras BatchNormalization"]
    print(f"width {args.width}, {args.stem} stem, batch {args.batch_size}: fused / keras = {ratio:.2f}x")


if __name__ == "__main__":
    main()
