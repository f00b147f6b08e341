"""The importance-criterion ablation's figure and table: one pruning run per criterion and seed (see
benchmarks/pruning_ablation.sh), compared at the same compressions.

    python benchmarks/pruning_ablation.py --ablation_root model/ablation/residual \
        --figure model/ablation/residual/ablation.png --table model/ablation/residual/ablation.md

Reads <ablation_root>/<run>/summary.json of every run folder (prune_model.py's output; the run's
--importance and --seed name it) and draws test accuracy against compression, one line per criterion
(solid: after fine-tuning, dotted: right after pruning; the mean over the criterion's seeds), from the
base model's point. The Markdown table gives, per criterion, the first iteration at or beyond ~2x and
~3x: its compression, test accuracy right after pruning and after fine-tuning, and the wall time spent
to get there. With several seeds a cell is their mean, followed by each seed's value. --verify
reloads every saved iteration model with plain Keras and checks its test accuracy against the summary.
"""

import os


from cnn_compression import cli  # noqa: E402
from cnn_compression import files  # noqa: E402

ORDER = ("apoz", "l1", "bn_scale", "taylor", "random")  # the table's row order; other runs follow by name
MEASURES = {"compression_rate": "compression (x fewer parameters)", "mac_ratio": "MAC reduction (x fewer MACs)"}


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablation_root", default="./model/ablation", help="the folder holding one pruning run per criterion")
    parser.add_argument("--figure", default=None, help="PNG to write (default: <ablation_root>/ablation.png)")
    parser.add_argument("--table", default=None, help="Markdown table to write (default: printed only)")
    parser.add_argument("--measure", choices=tuple(MEASURES), default="compression_rate",
                        help="the x axis and the ~2x / ~3x checkpoints")
    parser.add_argument("--levels", type=cli.positive_float, nargs="+", default=[2.0, 3.0],
                        help="the compressions the table reports (the first iteration at or beyond each)")
    parser.add_argument("--verify", action="store_true",
                        help="reload every run's saved iteration models with plain Keras and check their test accuracy "
                             "against summary.json (the CIFAR-10 test set: --data_dir or where data.py finds it)")
    parser.add_argument("--data_dir", default=None, help="cifar-10-batches-py folder for --verify")
    return parser.parse_args(argv)


def run_folders(root):
    """(folder, summary) of every run folder under `root` with a summary.json, by name."""
    if not os.path.isdir(root):
        raise cli.UserError(f"no ablation folder at {root}; run benchmarks/pruning_ablation.sh first")
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "summary.json")
        if os.path.isfile(path):
            yield os.path.join(root, name), files.read_json(path, "pruning summary")


def load_runs(root):
    """{criterion: [summary of each seed, by seed]} of every run folder under `root` with a summary.json."""
    runs = {}
    for folder, summary in run_folders(root):
        label = summary.get("arguments", {}).get("importance") or os.path.basename(folder)
        runs.setdefault(label, []).append(summary)
    if not runs:
        raise cli.UserError(f"no pruning run (summary.json) under {root}")
    for summaries in runs.values():
        summaries.sort(key=lambda summary: summary.get("arguments", {}).get("seed", 0))
    return dict(sorted(runs.items(), key=lambda item: (ORDER.index(item[0]) if item[0] in ORDER else len(ORDER), item[0])))


def checkpoint(summary, measure, level):
    """(record, seconds spent up to it) of the first iteration at or beyond `level`, else (None, None)."""
    seconds = 0.0
    for record in summary.get("iterations", []):
        seconds += record.get("seconds", 0.0)
        if record[measure] >= level * (1 - 1e-9):
            return record, seconds
    return None, None


def duration(seconds):
    if seconds is None:
        return "—"
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def mean(values):
    return sum(values) / len(values)


def percent_cell(values):
    """'63.53%' for one seed; '64.20% (63.53, 64.87)' for several: the mean, then each seed's."""
    if len(values) == 1:
        return f"{100 * values[0]:.2f}%"
    return f"{100 * mean(values):.2f}% (" + ", ".join(f"{100 * value:.2f}" for value in values) + ")"


def format_table(runs, measure, levels):
    header = ["importance", "seeds", "base test"]
    for level in levels:
        header += [f"~{level:g}x: iteration ({measure})", "test, pruned", "test, fine-tuned", "wall time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (1 + 4 * len(levels))]
    for label, summaries in runs.items():
        row = [label, str(len(summaries)), percent_cell(sorted({summary["base"]["test_acc"] for summary in summaries}))]
        for level in levels:
            reached = [found for found in (checkpoint(summary, measure, level) for summary in summaries) if found[0]]
            if not reached:
                row += ["not reached", "—", "—", "—"]
                continue
            iterations = sorted({record["iteration"] for record, _ in reached})
            where = "/".join(map(str, iterations)) + f" ({mean([record[measure] for record, _ in reached]):.2f}x)"
            if len(reached) < len(summaries):
                where += f", {len(reached)} of {len(summaries)} seeds"
            row += [where, percent_cell([record["test_acc_pruned"] for record, _ in reached]),
                    percent_cell([record["test_acc"] for record, _ in reached]), duration(mean([seconds for _, seconds in reached]))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def mean_curve(summaries, measure, key):
    """(compressions, mean of `key`) over the seeds, iteration by iteration, as far as every seed got."""
    depth = min(len(summary.get("iterations", [])) for summary in summaries)
    rates = [mean([summary["iterations"][index][measure] for summary in summaries]) for index in range(depth)]
    return rates, [100 * mean([summary["iterations"][index][key] for summary in summaries]) for index in range(depth)]


def plot(runs, measure, out):
    from cnn_compression.figures import pyplot, save_figure, test_images_note
    from cnn_compression.results import summary_test_images

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 5))
    for index, (label, summaries) in enumerate(runs.items()):
        colour = f"C{index % 10}"
        seeds = "" if len(summaries) == 1 else f" (mean of {len(summaries)} seeds)"
        base = 100 * mean([summary["base"]["test_acc"] for summary in summaries])
        rates, tuned = mean_curve(summaries, measure, "test_acc")
        axis.plot([1.0] + rates, [base] + tuned, "-o", color=colour, label=f"{label}, after fine-tuning{seeds}")
        rates, pruned = mean_curve(summaries, measure, "test_acc_pruned")
        axis.plot(rates, pruned, ":v", color=colour, alpha=0.7, label=f"{label}, right after pruning")
    axis.set(xlabel=MEASURES[measure], ylabel="test accuracy (%)")
    axis.legend(fontsize=7, ncol=2)
    figure.suptitle("Importance criteria: test accuracy against compression")
    note = test_images_note(summary_test_images(next(iter(runs.values()))[0]))
    if note:
        axis.set_title(note, fontsize=8, color="0.35")
    figure.tight_layout()
    save_figure(figure, out)
    return out


def verify(root, data_dir):
    """Each saved iteration model.h5 under `root`, loaded with plain Keras, against its summary's test
    accuracy; returns the lines printed. Raises UserError on a mismatch."""
    from cnn_compression import reproduction

    claims = []
    for folder, summary in run_folders(root):
        for record in summary.get("iterations", []):
            model_path = os.path.join(folder, f"iter{record['iteration']}", "model.h5")
            if os.path.isfile(model_path):
                claims.append(reproduction.Claim(f"{os.path.basename(folder)}, iteration {record['iteration']}",
                                                 model_path, record["test_acc"], summary.get("base", {}).get("test_images")))
    x_test, y_test = reproduction.test_set("cifar10", data_dir)
    return reproduction.check_claims(claims, x_test, y_test)


def main(argv=None):
    args = parse_args(argv)
    runs = load_runs(args.ablation_root)
    figure = plot(runs, args.measure, args.figure or os.path.join(args.ablation_root, "ablation.png"))
    print(f"wrote {figure}")
    table = format_table(runs, args.measure, args.levels)
    print(table)
    if args.table:
        files.write_text(args.table, table + "\n")
        print(f"wrote {args.table}")
    if args.verify:
        verify(args.ablation_root, args.data_dir)


if __name__ == "__main__":
    cli.run(main)
