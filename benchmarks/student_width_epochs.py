"""What do odd student widths cost a distillation run? The stage's own epoch, timed: for each
--student_round_to, `knowledge_distillation.py --student_compression R` trains the student alone
(--no_teacher) and with L_b from the teacher for two epochs on --train_size images, in fresh
processes, the variants alternating; the second epoch's seconds (the first traces) are read off the
stage's own log line (`50/50 - 21s - ...`), validation on the 5,000 validation images included.

    python benchmarks/student_width_epochs.py --root_folder model/cifar_stem/pruned_apoz/iter3 \\
        --base_model_path model/cifar_stem/base_model/model.h5 --student_compression 12.82 \\
        --round_to 1 8 --rounds 2 --data_dir ../shared/data/cifar-10-batches-py

Printed: per variant the median epoch seconds and training images per second of that epoch, with
each round's seconds, and the ratio to --student_round_to 1.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

from cnn_compression import cpu

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCH_LINE = re.compile(r"^\d+/\d+ - (\d+)s - ")
MODES = {"student alone": ["--no_teacher"], "L_b": ["--lambda1=0.7", "--lambda2=0", "--lambda3=0"]}


def epoch_seconds(arguments, folder):
    """(seconds of the stage's second epoch, student parameters) of one run into `folder`."""
    completed = subprocess.run([sys.executable, os.path.join(REPOSITORY, "knowledge_distillation.py"), *arguments,
                                "--save_folder", folder, "--epoch_num", "2", "--verbose", "2"],
                               capture_output=True, text=True, cwd=REPOSITORY)
    if completed.returncode != 0:
        sys.exit(f"knowledge_distillation.py failed: {completed.stderr.strip().splitlines()[-1:]}")
    seconds = [int(match.group(1)) for match in map(EPOCH_LINE.match, completed.stdout.splitlines()) if match]
    with open(os.path.join(folder, "config.json")) as handle:
        parameters = json.load(handle)["results"]["parameters"]
    return seconds[1], parameters


def stage_parser(description):
    """The flags of a benchmark that times this stage's epochs (this one's and its siblings')."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--root_folder", required=True, help="the teacher's folder (its model.h5)")
    parser.add_argument("--base_model_path", required=True)
    parser.add_argument("--student_compression", type=float, default=12.82)
    parser.add_argument("--train_size", type=int, default=6400, help="training images per epoch (batches of 128)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data_dir", default=None)
    return parser


def common_flags(args):
    """knowledge_distillation.py's flags every timed run shares: the strong run's recipe, float32."""
    common = ["--root_folder", args.root_folder, "--base_model_path", args.base_model_path,
              "--student_compression", str(args.student_compression), "--train_size", str(args.train_size),
              "--batch_size", "128", "--precision", "float32", "--student_learning_rate", "0.05", "--weight_decay", "5e-3"]
    return common + (["--data_dir", args.data_dir] if args.data_dir else [])


def time_variants(common, variants, flags_of, rounds):
    """({variant: [second-epoch seconds, one per round]}, {variant: student parameters}): every
    variant run once per round in a fresh process, the variants alternating; `flags_of(variant)`
    gives the run's flags after `common`."""
    seconds, parameters = {variant: [] for variant in variants}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(rounds):
            for index, variant in enumerate(variants):
                folder = os.path.join(scratch, f"{round_index}_{index}")
                taken, parameters[variant] = epoch_seconds(common + flags_of(variant), folder)
                seconds[variant].append(taken)
    return seconds, parameters


def main():
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--round_to", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    common = common_flags(args)
    variants = [(mode, multiple) for mode in MODES for multiple in args.round_to]
    seconds, parameters = time_variants(common, variants,
                                        lambda variant: MODES[variant[0]] + ["--student_round_to", str(variant[1])],
                                        args.rounds)
    print(f"students at {args.student_compression:g}x of {args.base_model_path} from {args.root_folder}; {cpu.model_name()}; "
          f"{args.rounds} fresh runs per variant, alternating; the second epoch of {args.train_size} training images "
          "(and the 5,000 validation images), float32")
    print("| variant | --student_round_to | parameters | epoch seconds (rounds) | training img/s | speed-up |")
    print("|---|---:|---:|---|---:|---:|")
    for mode, multiple in variants:
        median = statistics.median(seconds[mode, multiple])
        reference = statistics.median(seconds[mode, args.round_to[0]])
        print(f"| {mode} | {multiple} | {parameters[mode, multiple]:,} | {median:g} ({', '.join(map(str, seconds[mode, multiple]))}) | "
              f"{args.train_size / median:.0f} | {reference / median:.2f}x |")


if __name__ == "__main__":
    main()
