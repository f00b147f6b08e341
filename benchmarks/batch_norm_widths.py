"""BatchNorm's cost by channel count: TensorFlow's fused kernel (oneDNN on a CPU) against Keras' own
ops, forward and backward in training, and the path cnn_compression.fused_batch_norm takes.

    python benchmarks/batch_norm_widths.py --rounds 2

oneDNN's JIT BatchNorm works on whole vector blocks of channels; other counts, which pruning leaves
everywhere (51, 102, 205 ...), fall back to a generic kernel. One process, one layer per count, a
tf.function of the layer's training call and its gradient on 128 maps of --size x --size; printed:
the median milliseconds per call over the rounds (the counts alternate within each round).
"""

import argparse
import statistics
import time

COUNTS = (16, 17, 24, 32, 34, 48, 51, 56, 64, 69, 102, 104, 112, 128, 138, 205, 208, 256, 410)


def timed_step(channels, fused, size, repeats):
    import keras
    import tensorflow as tf

    from cnn_compression import fused_batch_norm

    layer = keras.layers.BatchNormalization()
    images = tf.random.normal((128, size, size, channels))
    layer.build(images.shape)
    call = fused_batch_norm.fused_call if fused else fused_batch_norm._keras_call

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = call(layer, x, training=True)
            loss = tf.reduce_sum(outputs * outputs)
        return tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])

    step(images)
    step(images)
    started = time.perf_counter()
    for _ in range(repeats):
        step(images)
    return 1e3 * (time.perf_counter() - started) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", type=int, default=16, help="height and width of the maps")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    import cnn_compression

    cnn_compression.setup()  # oneDNN on, the fused path installed
    from cnn_compression import fused_batch_norm
    from cnn_compression import onednn

    timings = {(count, fused): [] for count in COUNTS for fused in (True, False)}
    for _ in range(args.rounds):
        for count in COUNTS:
            for fused in (True, False):
                timings[count, fused].append(timed_step(count, fused, args.size, args.repeats))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{cpu}; oneDNN {'on' if onednn.enabled() else 'off'}; 128 x {args.size} x {args.size} x channels, float32, "
          f"training forward + backward, median of {args.rounds} rounds")
    print("| channels | fused kernel (ms) | Keras' ops (ms) | fused / Keras | path taken |")
    print("|---:|---:|---:|---:|---|")
    for count in COUNTS:
        fused, keras_ops = statistics.median(timings[count, True]), statistics.median(timings[count, False])
        path = "fused" if fused_batch_norm.fast_channel_count(count) else "Keras"
        print(f"| {count} | {fused:.2f} | {keras_ops:.2f} | {fused / keras_ops:.2f} | {path} |")


if __name__ == "__main__":
    main()
