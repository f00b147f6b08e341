"""Every speed figure of the README in one run: each ratio is taken within this process.

    python benchmarks/speed.py --data_dir=../shared/data/cifar-10-batches-py

1. APoZ pass against a predict pass over the same validation images (target <= 1.3x), and the
   surgery time of a full-width ResNet50 (benchmarks/prune_speed.py);
2. a distillation step against (teacher forward + student training step) (target <= 1.25x)
   (benchmarks/distillation_speed.py);
3. the base model against each compressed model: MAC ratio and measured CPU latency speed-up at
   batch 1 and batch 128 (target: speed-up >= 0.6x the MAC ratio at batch 128), base and model
   timed alternately so that machine load hits both alike.
"""

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import training  # noqa: E402

COMPRESSED = ("./model/pruned_model/iter5", "./model/pruned_model/iter10", "./model/pruned_model/iter15",
              "./model/kd_model/all_three")


def alternating_latency(first, second, batch_size, rounds):
    """Median latency (s) of two models at `batch_size`, measured in alternating rounds."""
    import evaluate_model

    timings = ([], [])
    for _ in range(rounds):
        for index, network in enumerate((first, second)):
            timings[index].append(evaluate_model.measure_latency(network, batch_size, repeats=3, warmup=1))
    return statistics.median(timings[0]), statistics.median(timings[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--base_model_path", default="./model/base_model/model.h5")
    parser.add_argument("--models", nargs="*", default=list(COMPRESSED), help="folders holding compressed model.h5 files")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], choices=("apoz", "distillation", "latency"))
    args = parser.parse_args()
    training.import_tensorflow()
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
        import model as resnet

        print("\n== base against compressed models: MAC ratio and CPU latency speed-up")
        base = training.load_model(args.base_model_path, "base model")
        base_macs = resnet.count_macs(base)[1]
        print(f"{'model':40s} {'MAC ratio':>9s} {'speed-up b1':>11s} {'speed-up b128':>13s} {'b128 / MAC ratio':>16s}")
        for folder in args.models:
            path = os.path.join(folder, "model.h5")
            if not os.path.exists(path):
                print(f"{folder:40s} (missing)")
                continue
            network = training.load_model(path)
            mac_ratio = base_macs / resnet.count_macs(network)[1]
            speedups = []
            for batch_size in (1, 128):
                base_seconds, seconds = alternating_latency(base, network, batch_size, args.rounds)
                speedups.append(base_seconds / seconds)
            print(f"{folder:40s} {mac_ratio:8.2f}x {speedups[0]:10.2f}x {speedups[1]:12.2f}x {speedups[1] / mac_ratio:15.2f}x")
        # The same comparison at full width, where arithmetic rather than per-layer overhead dominates.
        import numpy as np

        import prune

        full = resnet.build_resnet50()
        keep = {group["name"]: np.arange(max(1, resnet.group_width(resnet.full_width_spec(), group) // 2))
                for group in prune.prunable_groups(False)}
        halved = prune.prune_model(full, keep)
        mac_ratio = resnet.count_macs(full)[1] / resnet.count_macs(halved)[1]
        base_seconds, seconds = alternating_latency(full, halved, 128, args.rounds)
        speedup = base_seconds / seconds
        print(f"{'full width, inner channels halved':40s} {mac_ratio:8.2f}x {'':>11s} {speedup:12.2f}x {speedup / mac_ratio:15.2f}x")


if __name__ == "__main__":
    main()
