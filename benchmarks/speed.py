"""Every speed figure of the README in one run: each ratio is taken within this process.

    python benchmarks/speed.py --data_dir=../shared/data/cifar-10-batches-py

1. APoZ pass against a predict pass over the same validation images (target <= 1.3x), and the
   surgery time of a full-width ResNet50 (benchmarks/prune_speed.py);
2. a distillation step against (teacher forward + student training step) (target <= 1.25x)
   (benchmarks/distillation_speed.py);
3. the base model against each compressed model: MAC ratio, activation ratio (memory traffic) and
   measured CPU latency speed-up at batch 1 and batch 128 (target: speed-up >= 0.6x the MAC ratio
   at batch 128), in TensorFlow and as float32 TFLite, base and model timed alternately so that
   machine load hits both alike.
"""

import os
import statistics


from cnn_compression import checkpoints  # noqa: E402
import cnn_compression  # noqa: E402
from cnn_compression import cli  # noqa: E402

COMPRESSED = ("./model/pruned_model/iter5", "./model/pruned_model/iter10", "./model/pruned_model/iter15",
              "./model/pruned_residual/iter3", "./model/pruned_residual/iter6", "./model/kd_model/all_three")


def alternating_latency(first, second, batch_size, rounds, runtime="tensorflow"):
    """Median latency (s) of two models at `batch_size`, measured in alternating rounds.

    `first`/`second`: Keras models (runtime "tensorflow") or float32 TFLite flatbuffers ("tflite").
    """
    import evaluate_model
    from cnn_compression import tflite

    timings = ([], [])
    for _ in range(rounds):
        for index, network in enumerate((first, second)):
            if runtime == "tflite":
                timings[index].append(tflite.tflite_latency(network, batch_size, repeats=5, warmup=1))
            else:
                timings[index].append(evaluate_model.measure_latency(network, batch_size, repeats=3, warmup=1))
    return statistics.median(timings[0]), statistics.median(timings[1])


def main():
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--base_model_path", default="./model/base_model/model.h5")
    parser.add_argument("--models", nargs="*", default=list(COMPRESSED), help="folders holding compressed model.h5 files")
    parser.add_argument("--rounds", type=cli.positive_int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], choices=("apoz", "distillation", "latency"))
    args = parser.parse_args()
    cnn_compression.setup()  # TensorFlow quietly, and the fused BatchNorm the stages run
    data_flags = ["--data_dir", args.data_dir] if args.data_dir else []
    if "apoz" not in args.skip:
        import prune_speed

        print("== APoZ against predict, and surgery (full width, random weights)")
        prune_speed.main(["--width", "1.0", "--images", "2000", "--repeats", "3", *data_flags])
    if "distillation" not in args.skip:
        import distillation_speed

        teacher = os.path.join(args.models[2], "model.h5") if len(args.models) > 2 else args.base_model_path
        print(f"\n== distillation step against teacher forward + student step (teacher {teacher})")
        distillation_speed.main(["--teacher_path", teacher] if os.path.exists(teacher) else [])
    if "latency" not in args.skip:
        from cnn_compression import tflite
        import model as resnet

        print("\n== base against compressed models: MAC ratio and CPU latency speed-up, in TensorFlow (tf.function)"
              " and as float32 TFLite (XNNPACK)")
        base = checkpoints.load_model(args.base_model_path, "base model")
        base_tflite = tflite.float_tflite(base)
        base_macs, base_activations = resnet.count_macs(base)[1], resnet.count_activations(base)
        print(f"{'model':36s} {'MACs':>6s} {'activ.':>6s} {'TF b1':>6s} {'TF b128':>7s} {'/MACs':>5s} "
              f"{'TFLite b1':>9s} {'TFLite b128':>11s} {'/MACs':>5s}")
        for folder in args.models:
            path = os.path.join(folder, "model.h5")
            if not os.path.exists(path):
                print(f"{folder:36s} (missing)")
                continue
            network = checkpoints.load_model(path)
            mac_ratio = base_macs / resnet.count_macs(network)[1]
            activation_ratio = base_activations / resnet.count_activations(network)
            row = []
            for runtime, pair in (("tensorflow", (base, network)), ("tflite", (base_tflite, tflite.float_tflite(network)))):
                for batch_size in (1, 128):
                    base_seconds, seconds = alternating_latency(*pair, batch_size, args.rounds, runtime)
                    row.append(base_seconds / seconds)
            print(f"{folder:36s} {mac_ratio:5.2f}x {activation_ratio:5.2f}x {row[0]:5.2f}x {row[1]:6.2f}x {row[1] / mac_ratio:5.2f} "
                  f"{row[2]:8.2f}x {row[3]:10.2f}x {row[3] / mac_ratio:5.2f}")
        # The same comparison at full width, where arithmetic rather than per-layer overhead dominates.
        import numpy as np

        import prune

        full = resnet.build_resnet50()
        groups = prune.any_model_groups(full, ignored_layers=["conv1_conv"])  # conv1 and conv2 of every block
        halved = prune.prune_groups(full, groups, {group["name"]: np.arange(max(1, group["width"] // 2)) for group in groups})
        mac_ratio = resnet.count_macs(full)[1] / resnet.count_macs(halved)[1]
        base_seconds, seconds = alternating_latency(full, halved, 128, args.rounds)
        speedup = base_seconds / seconds
        print(f"full width, inner channels halved: MACs {mac_ratio:.2f}x, TF b128 {speedup:.2f}x ({speedup / mac_ratio:.2f} of the MAC ratio)")


if __name__ == "__main__":
    cli.run(main)
