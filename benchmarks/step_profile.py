"""Where a training step's time goes, at the CIFAR stem (the size that dominates the cost).

    python benchmarks/step_profile.py --stem cifar --width 0.25 --batch_size 128

Times, interleaved round after round in one process, the parts of one `fit` step of the shared
ResNet50 (fused BatchNorm, --precision as given):
  input     producing a batch through the training pipeline (crop, flip, cast, one-hot)
  forward   the model's training-mode forward pass and loss
  backward  forward + gradients (so backward alone = backward - forward)
  optimizer applying SGD (Nesterov momentum, weight decay) to precomputed gradients
  fit step  a whole `model.fit` step on in-memory batches (includes Keras' metrics and callbacks)
and prints each part's median milliseconds and share of the fit step. Then (--profile_steps) it
records `fit` steps under TensorFlow's profiler and prints where the executor's time goes by op
type (the op events of the trace's compute threads, summed): convolutions, BatchNorm, ReLU and
adds, the optimizer's updates, casts and layout changes, the rest.
"""

import argparse
import collections
import glob
import os
import re
import statistics
import tempfile
import time

import cnn_compression  # noqa: E402
from cnn_compression import training  # noqa: E402


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


# Op types by what they are, for the profile's summary (anything else: "other").
OP_KINDS = {
    "convolution": ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter", "_FusedConv2D", "DepthwiseConv2dNative"),
    "BatchNorm": ("FusedBatchNormV3", "FusedBatchNormGradV3", "_FusedBatchNormEx"),
    "ReLU, add, other element-wise": ("Relu", "ReluGrad", "AddV2", "AddN", "Mul", "Sub", "RealDiv", "Maximum", "Square",
                                      "Rsqrt", "Sqrt", "Neg", "Sum", "Mean", "BiasAdd", "BiasAddGrad", "Select", "Exp", "Log",
                                      "Softmax", "Tile", "BroadcastTo", "Reshape", "Pad", "StridedSlice", "ZerosLike",
                                      "OnesLike", "Fill"),
    "optimizer (SGD, weight decay)": ("AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp", "ReadVariableOp",
                                      "ResourceApplyKerasMomentum", "ResourceApplyMomentum", "ResourceApplyGradientDescent"),
    "casts and layout": ("Cast", "Transpose", "_MklToTf", "ConcatV2", "Identity"),
    "dense (classifier)": ("MatMul", "_MklMatMul"),
}


def op_profile(network, dataset, steps):
    """{op type: seconds} of `steps` fit steps recorded by TensorFlow's profiler (op events of the
    compute threads; nested call ops left out)."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    with tempfile.TemporaryDirectory() as folder:
        tf.profiler.experimental.start(folder)
        network.fit(dataset.take(steps), epochs=1, verbose=0)
        tf.profiler.experimental.stop()
        path = sorted(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True))[-1]
        space = xplane_pb2.XSpace()
        with open(path, "rb") as handle:
            space.ParseFromString(handle.read())
    totals = collections.Counter()
    for plane in space.planes:
        names = {key: value.name for key, value in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if ":" not in name or "::" in name:  # executor bookkeeping (ExecutorState::Process, ParallelFor) around the ops
                    continue
                op_type = name.rsplit(":", 1)[1]
                if "PartitionedCall" in op_type:
                    continue
                totals[op_type] += event.duration_ps * 1e-12
    return totals


def op_kind(op_type):
    """The OP_KINDS entry of an op type, oneDNN's rewrites included (_MklNativeFusedConv2D,
    _MklNativeConv2DBackpropFilterWithBias, ...: TensorFlow's names for its oneDNN kernels)."""
    plain = re.sub(r"^_Mkl(Native)?", "", op_type).replace("WithBias", "")
    for kind, members in OP_KINDS.items():
        if op_type in members or plain in members or f"_{plain}" in members:
            return kind
    return "other"


def print_op_profile(totals, steps, batch_size):
    all_ops = sum(totals.values())
    kinds = collections.Counter()
    for op_type, seconds in totals.items():
        kinds[op_kind(op_type)] += seconds
    print(f"op time over {steps} fit steps: {all_ops:.2f} s on the compute threads "
          f"({all_ops / steps * 1e3:.0f} ms per step of {batch_size} images)")
    print("| op kind | ms per step | share of op time |")
    print("|---|---:|---:|")
    for kind, seconds in kinds.most_common():
        print(f"| {kind} | {seconds / steps * 1e3:.1f} | {seconds / all_ops:.0%} |")
    print("| op type (top 12) | ms per step | share of op time |")
    print("|---|---:|---:|")
    for op_type, seconds in totals.most_common(12):
        print(f"| {op_type} | {seconds / steps * 1e3:.1f} | {seconds / all_ops:.0%} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stem", default="cifar")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each part per round")
    parser.add_argument("--profile_steps", type=int, default=10, help="fit steps recorded by the profiler (0: none)")
    args = parser.parse_args()
    cnn_compression.setup()  # TensorFlow quietly, and the fused BatchNorm the stages run
    import keras
    import numpy as np
    import tensorflow as tf

    from cnn_compression import data
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
    if args.profile_steps:
        print_op_profile(op_profile(network, in_memory, args.profile_steps), args.profile_steps, args.batch_size)


if __name__ == "__main__":
    main()
