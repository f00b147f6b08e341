"""Training throughput: Keras' BatchNorm against the fused kernel, in float32 and bfloat16.

    python benchmarks/train_speed.py                      # cifar stem width 0.25, imagenet stem width 1.0
    python benchmarks/train_speed.py --models cifar:0.25 --rounds 5

For each model, builds three copies and times them interleaved, round after round, in one process
(so machine load hits all alike): Keras' own BatchNorm in float32 (the reference), the fused
kernel in float32, and the fused kernel under mixed_bfloat16. Each round is `--steps` batches of
`model.fit` on an in-memory pipeline (random pixels: speed does not depend on them). Prints the
median images/s, the ratio to the reference, and the convolutions' GFLOP/s (3x the forward MACs x
2 per image: forward, input and weight gradients) next to a raw convolution's forward+backward
rate measured here, i.e. how close a step gets to the hardware. Then APoZ pass and `predict`
times with each BatchNorm path.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402
import training  # noqa: E402

VARIANTS = (("keras BN float32", False, "float32"), ("fused float32", True, "float32"),
            ("fused bfloat16", True, "mixed_bfloat16"))


def model_spec(text):
    stem, width = text.split(":")
    return stem, float(width)


def schedule():
    return argparse.Namespace(epoch_num=1, learning_rate=0.01, momentum=0.9, weight_decay=5e-4, label_smoothing=0.0,
                              lr_schedule="cosine", warmup_epochs=0, step_epochs=60)


def raw_convolution_rate(dtype, batch=128, size=16, channels=64, repeats=10):
    """GFLOP/s of a 3x3 convolution's forward and both gradients (the bulk of a ResNet step)."""
    import tensorflow as tf

    x = tf.Variable(tf.random.normal([batch, size, size, channels], dtype=tf.float32))
    kernel = tf.Variable(tf.random.normal([3, 3, channels, channels], dtype=tf.float32))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            y = tf.nn.conv2d(tf.cast(x, dtype), tf.cast(kernel, dtype), 1, "SAME")
            loss = tf.reduce_sum(tf.cast(y, tf.float32))
        return tape.gradient(loss, [x, kernel])

    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(repeats):
        [g.numpy() for g in step()]
    seconds = (time.perf_counter() - started) / repeats
    flops = 3 * 2 * batch * size * size * 9 * channels * channels
    return flops / seconds / 1e9


def build_variant(stem, width, fused, precision, batch_size, dataset, steps):
    import fused_batch_norm
    import model as resnet

    training.set_precision(precision)
    context = fused_batch_norm.keras_batch_norm() if not fused else _nothing()
    with context:
        network = resnet.build_resnet50(resnet.width_spec(width), stem)
        training.compile_classifier(network, schedule(), steps)
        network.fit(dataset.take(2), epochs=1, verbose=0, shuffle=False)  # traced here, on this BatchNorm path
    training.set_precision("float32")
    return network


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def time_training(networks, dataset, steps, batch_size, rounds):
    rates = {name: [] for name in networks}
    for _ in range(rounds):
        for name, network in networks.items():
            started = time.perf_counter()
            network.fit(dataset.take(steps), epochs=1, verbose=0, shuffle=False)
            rates[name].append(steps * batch_size / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in rates.items()}


def time_inference(stem, width, images, rounds):
    """Seconds of an APoZ pass (inner layers) and of `predict`, with Keras' BatchNorm and the fused one."""
    import channel_importance
    import fused_batch_norm
    import model as resnet
    import prune

    network = resnet.build_resnet50(resnet.width_spec(width), stem)
    names = [name for group in prune.prunable_groups() for name in group["activations"]]
    timings = {}
    for label, context in (("keras BN", fused_batch_norm.keras_batch_norm), ("fused", _nothing)):
        with context():
            counter = channel_importance.zero_counter(network, names)
            channel_importance.apoz(network, names, images[:256], verbose=0, count=counter)
            twin = resnet.rebuild_like(network)
            twin.set_weights(network.get_weights())
            twin.predict(images[:256], batch_size=128, verbose=0)
            apoz_times, predict_times = [], []
            for _ in range(rounds):
                started = time.perf_counter()
                channel_importance.apoz(network, names, images, verbose=0, count=counter)
                apoz_times.append(time.perf_counter() - started)
                started = time.perf_counter()
                twin.predict(images, batch_size=128, verbose=0)
                predict_times.append(time.perf_counter() - started)
        timings[label] = (statistics.median(apoz_times), statistics.median(predict_times))
    return timings


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=model_spec, nargs="+", default=[("cifar", 0.25), ("imagenet", 1.0)],
                        help="stem:width pairs")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="batches per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inference_images", type=int, default=2000)
    parser.add_argument("--bfloat16", choices=("native", "always"), default="native",
                        help="native: time the bfloat16 variant only where the hardware computes bfloat16 natively "
                             "(elsewhere TensorFlow emulates it, 10x or more slower than float32)")
    args = parser.parse_args()
    cli.import_tensorflow()
    import numpy as np
    import tensorflow as tf

    import model as resnet

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch_size * 4, 32, 32, 3)).astype(np.float32)
    labels = tf.one_hot(rng.integers(0, 10, len(images)), 10)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(args.batch_size).cache().repeat().prefetch(2)
    print(f"machine: {os.cpu_count()} cores; native bfloat16: {training.native_bfloat16()}; "
          f"--precision auto gives {training.resolve_precision('auto')}")
    raw = {dtype: raw_convolution_rate(dtype) for dtype in (tf.float32, tf.bfloat16)}
    print(f"raw 3x3 convolution forward+backward: {raw[tf.float32]:.0f} GFLOP/s float32, {raw[tf.bfloat16]:.0f} GFLOP/s bfloat16")
    variants = [variant for variant in VARIANTS
                if variant[2] == "float32" or args.bfloat16 == "always" or training.native_bfloat16()]
    if len(variants) < len(VARIANTS):
        print("(no native bfloat16 here: the bfloat16 variant is skipped; --bfloat16 always times it anyway)")
    print()
    print("| model | BatchNorm path | images/s | vs Keras' BN | conv GFLOP/s | of raw conv rate |")
    print("|---|---|---:|---:|---:|---:|")
    for stem, width in args.models:
        networks = {name: build_variant(stem, width, fused, precision, args.batch_size, dataset, args.steps)
                    for name, fused, precision in variants}
        macs = resnet.count_macs(next(iter(networks.values())))[1]
        rates = time_training(networks, dataset, args.steps, args.batch_size, args.rounds)
        reference = rates[variants[0][0]]
        for name, _, precision in variants:
            gflops = 3 * 2 * macs * rates[name] / 1e9
            rate = raw[tf.bfloat16 if precision == "mixed_bfloat16" else tf.float32]
            print(f"| {stem} stem, width {width:g} | {name} | {rates[name]:.0f} | {rates[name] / reference:.2f}x | "
                  f"{gflops:.0f} | {gflops / rate:.0%} |")
        del networks
    print()
    inference_images = rng.integers(0, 256, (args.inference_images, 32, 32, 3)).astype(np.float32)
    for stem, width in args.models:
        timings = time_inference(stem, width, inference_images, args.rounds)
        (apoz_keras, predict_keras), (apoz_fused, predict_fused) = timings["keras BN"], timings["fused"]
        print(f"{stem} stem, width {width:g}, {args.inference_images} images: APoZ pass {apoz_keras:.2f} s -> "
              f"{apoz_fused:.2f} s ({apoz_keras / apoz_fused:.2f}x); predict {predict_keras:.2f} s -> "
              f"{predict_fused:.2f} s ({predict_keras / predict_fused:.2f}x)")


if __name__ == "__main__":
    main()
