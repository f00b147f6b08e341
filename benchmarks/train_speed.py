"""Training throughput of the shared ResNet50 through the real input pipeline.

    python benchmarks/train_speed.py --width 1.0 --stem imagenet --batch_size 128 --steps 25

Prints images/s of `model.fit` (best of --repeats timed runs after a warm-up that absorbs tracing)
and the time of one 45,000-image epoch. Random images: speed does not depend on the pixels.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import training  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--stem", default="imagenet")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16"))
    args = parser.parse_args()
    training.import_tensorflow()
    import numpy as np

    import data
    import model as resnet

    training.set_precision(args.precision)
    rng = np.random.default_rng(0)
    count = args.batch_size * (args.steps + 3)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    dataset = data.make_dataset(images, rng.integers(0, 10, count), args.batch_size, training=True).repeat()
    schedule = argparse.Namespace(epoch_num=1, learning_rate=0.01, momentum=0.9, weight_decay=5e-4,
                                  label_smoothing=0.0, lr_schedule="cosine", warmup_epochs=0, step_epochs=60)
    network = resnet.build_resnet50(resnet.width_spec(args.width), args.stem)
    training.compile_classifier(network, schedule, args.steps)
    network.fit(dataset.take(3), epochs=1, verbose=0, shuffle=False)  # trace and warm up
    best = 0.0
    for _ in range(args.repeats):
        start = time.perf_counter()
        network.fit(dataset.take(args.steps), epochs=1, verbose=0, shuffle=False)
        best = max(best, args.steps * args.batch_size / (time.perf_counter() - start))
    print(f"width {args.width}, {args.stem} stem, batch {args.batch_size}, {args.precision}: "
          f"{best:.0f} images/s, {45000 / best:.0f} s per 45,000-image epoch")


if __name__ == "__main__":
    main()
