"""Where a training step's time goes, at the CIFAR stem (the size that dominates the cost).

    python benchmarks/step_profile.py --stem cifar --width 0.25 --batch_size 128

Times, interleaved round after round in one process, the parts of one `fit` step of the shared
ResNet50 (fused BatchNorm, --precision as given):
  input     producing a batch through the training pipeline (crop, flip, cast, one-hot)
  forward   the model's training-mode forward pass and loss
  backward  forward + gradients (so backward alone = backward - forward)
  optimizer applying SGD (Nesterov momentum, weight decay) to precomputed gradients
  fit step  a whole `model.fit` step on in-memory batches (includes Keras' metrics and callbacks)
and prints each part's median milliseconds and share of the fit step.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402
import training  # noqa: E402


FIT_STEPS = 20


def timed(function, repeats):
    function()  # trace / warm up
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stem", default="cifar")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each part per round")
    args = parser.parse_args()
    cli.import_tensorflow()
    import keras
    import numpy as np
    import tensorflow as tf

    import data
    import model as resnet

    precision = training.set_precision(args.precision)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch_size * 8, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, len(images))
    pipeline = data.make_dataset(images, labels, args.batch_size, training=True).repeat()
    iterator = iter(pipeline)
    x, y = next(iterator)
    schedule = argparse.Namespace(epoch_num=1, learning_rate=0.01, momentum=0.9, weight_decay=5e-4, label_smoothing=0.0,
                                  lr_schedule="cosine", warmup_epochs=0, step_epochs=60)
    network = resnet.build_resnet50(resnet.width_spec(args.width), args.stem)
    training.compile_classifier(network, schedule, 1000)
    loss_function = keras.losses.CategoricalCrossentropy()
    variables = network.trainable_variables

    @tf.function
    def forward():
        return loss_function(y, network(x, training=True))

    @tf.function
    def backward():
        with tf.GradientTape() as tape:
            loss = loss_function(y, network(x, training=True))
        return tape.gradient(loss, variables)

    gradients = backward()
    network.optimizer.build(variables)

    @tf.function
    def optimize():
        network.optimizer.apply(gradients, variables)

    in_memory = tf.data.Dataset.from_tensors((x, y)).repeat()
    parts = {
        "input": lambda: next(iterator)[0].numpy(),
        "forward": lambda: forward().numpy(),
        "backward": lambda: [g.numpy() for g in backward()[:1]],
        "optimizer": lambda: optimize(),
        # Many steps per fit call, so that starting an epoch (iterator, callbacks) is amortised as in a real epoch.
        "fit step": lambda: network.fit(in_memory.take(FIT_STEPS), epochs=1, verbose=0),
    }
    samples = {name: [] for name in parts}
    for _ in range(args.rounds):
        for name, function in parts.items():
            samples[name] += timed(function, args.repeats)
    medians = {name: 1e3 * statistics.median(values) for name, values in samples.items()}
    medians["fit step"] /= FIT_STEPS
    step = medians["fit step"]
    print(f"{args.stem} stem, width {args.width:g}, batch {args.batch_size}, {precision}, fused BatchNorm: "
          f"fit step {step:.0f} ms ({args.batch_size / step * 1e3:.0f} images/s)")
    print("| part | ms | share of the fit step |")
    print("|---|---:|---:|")
    rows = [("input pipeline (runs ahead in parallel during fit)", medians["input"]),
            ("forward + loss", medians["forward"]),
            ("backward (gradients)", medians["backward"] - medians["forward"]),
            ("optimizer update", medians["optimizer"]),
            ("rest of the fit step (metrics, callbacks, dispatch)",
             step - medians["backward"] - medians["optimizer"])]
    for name, value in rows:
        print(f"| {name} | {value:.1f} | {value / step:.0%} |")


if __name__ == "__main__":
    main()
