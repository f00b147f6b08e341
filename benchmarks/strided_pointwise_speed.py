"""Does computing strided 1x1 convolutions' kernel gradient exactly (cnn_compression.strided_pointwise)
cost training time? Forward and backward of the six strided 1x1 convolutions of the CIFAR-stem base
at width 0.25 (batch 128), Keras' own path against ours, interleaved in one process.

    python benchmarks/strided_pointwise_speed.py --rounds 5
"""

import argparse
import statistics
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="steps of the six layers per timed round")
    args = parser.parse_args()
    import cnn_compression

    cnn_compression.setup()
    import numpy as np
    import tensorflow as tf
    import keras

    from cnn_compression import cpu
    from cnn_compression import strided_pointwise

    if not strided_pointwise.installed():
        raise SystemExit("oneDNN is off here: Keras' own convolution runs, nothing to compare")
    # (map size, input channels, filters) of conv3-5_block1's 1x1 and shortcut convolutions
    shapes = [(32, 64, 128), (32, 64, 32), (16, 128, 256), (16, 128, 64), (8, 256, 512), (8, 256, 128)]
    rng = np.random.default_rng(0)
    paths = {"Keras' convolution": strided_pointwise._keras_convolution_op,
             "exact kernel gradient": strided_pointwise.pointwise_convolution_op}
    steps = {}
    for name, operation in paths.items():
        steps[name] = []
        for size, channels, filters in shapes:
            layer = keras.layers.Conv2D(filters, 1, strides=2)
            inputs = tf.constant(rng.normal(size=(128, size, size, channels)).astype("float32"))
            layer.build(inputs.shape)

            @tf.function
            def step(inputs, layer=layer, operation=operation):
                with tf.GradientTape() as tape:
                    tape.watch(inputs)
                    outputs = operation(layer, inputs, layer.kernel)
                    loss = tf.reduce_sum(outputs * outputs)
                return tape.gradient(loss, [inputs, layer.kernel])

            step(inputs)  # traced before timing
            steps[name].append((step, inputs))
    times = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, pairs in steps.items():
            started = time.perf_counter()
            for _ in range(args.repeats):
                for step, inputs in pairs:
                    [gradient.numpy() for gradient in step(inputs)]
            times[name].append(1000 * (time.perf_counter() - started) / args.repeats)
    print(f"{cpu.model_name()}; {args.rounds} interleaved rounds; ms per step of the six layers, forward and backward")
    for name, values in times.items():
        print(f"{name}: {statistics.median(values):.1f} ms (rounds {', '.join(f'{v:.0f}' for v in values)})")


if __name__ == "__main__":
    main()
