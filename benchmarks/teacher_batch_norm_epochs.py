"""What does folding the frozen teacher's BatchNorms save a distillation run? The stage's own
epoch, timed: `knowledge_distillation.py --teacher_batch_norm keep` and `fold` with L_b, and with
L_b + L_intermediate (VID regressors on the stage outputs), for two epochs on --train_size images,
in fresh processes, the variants alternating; the second epoch's seconds (the first traces) are read
off the stage's log line, validation on the 5,000 validation images included.

    python benchmarks/teacher_batch_norm_epochs.py --root_folder model/cifar_stem/pruned_apoz/iter3 \\
        --base_model_path model/cifar_stem/base_model/model.h5 --rounds 2 --data_dir ../shared/data/cifar-10-batches-py

Printed: per variant the median epoch seconds and training images per second, each round's
seconds, and the ratio of keep's median to fold's.
"""

import statistics

from cnn_compression import cpu
from student_width_epochs import common_flags, stage_parser, time_variants

MODES = {"L_b": ["--lambda1=0.7", "--lambda2=0", "--lambda3=0"],
         "L_b + L_inter (vid)": ["--lambda1=0.7", "--lambda2=0.3", "--lambda3=0", "--regressor_name", "vid"]}


def main():
    args = stage_parser(__doc__.splitlines()[0]).parse_args()
    common = common_flags(args)
    variants = [(mode, choice) for mode in MODES for choice in ("keep", "fold")]
    seconds, _ = time_variants(common, variants, lambda variant: MODES[variant[0]] + ["--teacher_batch_norm", variant[1]],
                               args.rounds)
    print(f"students at {args.student_compression:g}x from {args.root_folder}; {cpu.model_name()}; {args.rounds} fresh runs per "
          f"variant, alternating; the second epoch of {args.train_size} training images (and the 5,000 validation "
          "images), float32")
    print("| loss | --teacher_batch_norm | epoch seconds (rounds) | training img/s | speed-up |")
    print("|---|---|---|---:|---:|")
    for mode, choice in variants:
        median = statistics.median(seconds[mode, choice])
        reference = statistics.median(seconds[mode, "keep"])
        print(f"| {mode} | {choice} | {median:g} ({', '.join(map(str, seconds[mode, choice]))}) | "
              f"{args.train_size / median:.0f} | {reference / median:.2f}x |")


if __name__ == "__main__":
    main()
