"""The training loss's gradient norm on random batches of a few sizes, in training mode.

    python benchmarks/batch_gradient_norms.py --model_path model/base_model/model.h5 --sizes 16 72 128

Why training epochs leave out their partial last batch (docs/data.md): BatchNorm's batch statistics
over a handful of images blow the gradient up where feature maps are small. Printed per batch size:
the median, 90th percentile and maximum of the global gradient norm over `--batches` random
batches of the training split, and the median and maximum loss. Measured on the committed
imagenet-stem base (2026-12-01, Intel Xeon with AMX-BF16; float32, so any CPU gives the same
figures up to summation order): batches of 16 median 37.45, max 288.23; of 72 median 2.39, max
2.91; of 128 median 1.67, max 2.14.
"""

from cnn_compression import cli


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", required=True, help="a classifier .h5/.keras giving class probabilities")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 72, 128])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=None)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import cnn_compression

    cnn_compression.setup()
    import keras
    import numpy as np
    import tensorflow as tf

    from cnn_compression import checkpoints, data

    network = checkpoints.load_model(args.model_path, "--model_path")  # a bad file before the data set
    split = data.load_split("cifar10", args.data_dir)
    loss_function = keras.losses.CategoricalCrossentropy()

    @tf.function(reduce_retracing=True)
    def gradient_norm(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_function(labels, network(images, training=True))
        return loss, tf.linalg.global_norm(tape.gradient(loss, network.trainable_variables))

    generator = np.random.default_rng(args.seed)
    for size in args.sizes:
        norms, losses = [], []
        for _ in range(args.batches):
            chosen = generator.choice(len(split.y_train), size, replace=False)
            loss, norm = gradient_norm(tf.constant(split.x_train[chosen].astype("float32")),
                                       tf.one_hot(split.y_train[chosen], network.output_shape[-1]))
            norms.append(float(norm))
            losses.append(float(loss))
        print(f"batch {size:4d}: gradient norm median {np.median(norms):8.2f}, 90th percentile "
              f"{np.percentile(norms, 90):8.2f}, max {max(norms):9.2f}; loss median {np.median(losses):.3f}, max {max(losses):.3f}")


if __name__ == "__main__":
    cli.run(main)
