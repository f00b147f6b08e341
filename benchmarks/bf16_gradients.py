"""How far bfloat16 turns a training step's gradient, against how far the network itself turns it.

    python benchmarks/bf16_gradients.py                                   # a fresh cifar-stem ResNet50, width 0.25
    python benchmarks/bf16_gradients.py --model_path model/base_model/model.h5

One batch of real training images, one set of weights, four gradients of the stage's loss in
training mode: float32 through Keras' BatchNorm (the reference), float32 through the fused kernel the
stages run, mixed_bfloat16 through both, and a control: float32 with the input moved by Gaussian
noise of `--noise` grey levels (of 255). Printed per variant: the loss, the cosine between its whole
gradient and the reference's, their norm ratio and the median per-variable cosine (conv biases that
a BatchNorm follows have no gradient but rounding, so they are left out of the median).

What it showed (issue 21, Intel Xeon with AMX-BF16, 2026-12-01): on a fresh cifar-stem network at
width 0.25, bfloat16's cosine is 0.24 (Keras BatchNorm) and 0.36 (fused), half a grey level of input
noise gives 0.09, and even float32's two BatchNorm paths, which differ only in summation order,
0.999: a fresh network's gradient is chaotic, so a short run from scratch cannot tell precisions
apart. From the committed imagenet-stem base (`--model_path model/base_model/model.h5
--label_smoothing 0`) bfloat16 gives 0.994 and the control 0.995 (0.996 against 0.986 on the strong
run's cifar-stem base at epoch 19): a trained network's step turns no more under bfloat16 than
under a half-grey-level change of its input.
"""

from cnn_compression import cli


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", default=None, help="our ResNet50 .h5 to take the weights from (default: fresh)")
    parser.add_argument("--stem", default="cifar", choices=("cifar", "imagenet"))
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--noise", type=float, default=0.5, help="the control's input noise, in grey levels")
    parser.add_argument("--label_smoothing", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=None)
    return parser.parse_args(argv)


def cosine(a, b):
    import numpy as np

    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def main(argv=None):
    args = parse_args(argv)
    import cnn_compression

    cnn_compression.setup()
    import keras
    import numpy as np
    import tensorflow as tf

    import model as resnet
    from cnn_compression import checkpoints, data, fused_batch_norm

    split = data.load_split("cifar10", args.data_dir, train_size=max(args.batch_size, 1000), seed=args.seed)
    images = tf.constant(split.x_train[: args.batch_size].astype("float32"))
    labels = tf.one_hot(split.y_train[: args.batch_size], 10)
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(args.seed)
    if args.model_path:
        source = checkpoints.load_model(args.model_path, "--model_path")
        spec, stem, _, _ = resnet.describe_model(source)
        weights = source.get_weights()
    else:
        spec, stem = resnet.width_spec(args.width), args.stem
        weights = resnet.build_resnet50(spec, stem).get_weights()
    loss_function = keras.losses.CategoricalCrossentropy(label_smoothing=args.label_smoothing)

    def gradients(policy, fused, noise):
        keras.mixed_precision.set_global_policy(policy)
        (fused_batch_norm.install if fused else fused_batch_norm.uninstall)()
        network = resnet.build_resnet50(spec, stem)
        network.set_weights(weights)

        @tf.function
        def step(batch):
            with tf.GradientTape() as tape:
                loss = loss_function(labels, network(batch, training=True))
            return loss, tape.gradient(loss, network.trainable_variables)

        batch = images + noise * tf.random.stateless_normal(images.shape, seed=(args.seed, 1))
        loss, grads = step(batch)
        names = [variable.path for variable in network.trainable_variables]
        return float(loss), [g.numpy().astype("float64").ravel() for g in grads], names

    variants = [("float32", False, 0.0), ("float32", True, 0.0), ("float32", False, args.noise),
                ("mixed_bfloat16", False, 0.0), ("mixed_bfloat16", True, 0.0)]
    reference = None
    print(f"{'precision':15s} {'BatchNorm':9s} {'noise':>5s} {'loss':>8s} {'cosine':>7s} {'norm ratio':>10s} {'median variable cosine':>22s}")
    for policy, fused, noise in variants:
        loss, grads, names = gradients(policy, fused, noise)
        if reference is None:
            reference = grads
        whole = cosine(np.concatenate(reference), np.concatenate(grads))
        ratio = np.linalg.norm(np.concatenate(grads)) / np.linalg.norm(np.concatenate(reference))
        per_variable = [cosine(a, b) for a, b, name in zip(reference, grads, names) if not name.endswith("conv/bias")]
        print(f"{policy:15s} {'fused' if fused else 'Keras':9s} {noise:5.2f} {loss:8.5f} {whole:7.4f} {ratio:10.4f} "
              f"{float(np.median(per_variable)):22.4f}")
    fused_batch_norm.install()


if __name__ == "__main__":
    cli.run(main)
