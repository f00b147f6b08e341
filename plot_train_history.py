"""Stage 5: draw training histories and the result figures.

    python plot_train_history.py --history_path=./model/pruned_model/iter1/history.json
    python plot_train_history.py --figures            # every figure under images/ from model/
    python plot_train_history.py --verify --model_root=./model/cifar_stem   # the table's rows, reproduced
    python plot_train_history.py --compare=./model/cifar_stem/kd_tuning      # a sweep's runs side by side

A history figure shows loss and accuracy (training and validation) per epoch; several
--history_path values overlay on one figure. --verify reloads the saved model of every row of the
results table with plain Keras and checks that it gives the row's test accuracy. The drawing is
cnn_compression.figures', the records and the results table cnn_compression.results', the check
cnn_compression.reproduction's.
"""

import os

import cnn_compression
from cnn_compression import checkpoints
from cnn_compression import cli
from cnn_compression import figures
from cnn_compression import files
from cnn_compression import reproduction
from cnn_compression import results


def parse_args(argv=None):
    parser = cli.Parser(description="Plot training histories and result figures.")
    parser.add_argument("--history_path", action="append", default=[], help="a history.json (repeat to overlay)")
    parser.add_argument("--out", default=None, help="PNG to write (default: history.png beside the first history)")
    parser.add_argument("--figures", action="store_true", help="draw the result figures from --model_root into --images_dir")
    parser.add_argument("--model_root", default="./model", help="where the stages wrote their folders")
    parser.add_argument("--images_dir", default="./images")
    parser.add_argument("--compare", default=None, metavar="FOLDER",
                        help="print a table of the finished training runs under FOLDER (base training or distillation), "
                             "one row each, with the arguments in which they differ")
    parser.add_argument("--table", default=None, metavar="PATH",
                        help="with --figures or --compare: also write that table (Markdown) to PATH")
    parser.add_argument("--verify", action="store_true",
                        help="reload each results-table row's saved model (under --model_root) with plain Keras and "
                             "check its test accuracy against the row; exit code 2 if one differs")
    parser.add_argument("--data_dir", default=None,
                        help="for --verify: a cifar-10-batches-py folder or cifar-10-python.tar.gz (else $CIFAR10_DIR, "
                             "the Keras cache)")
    args = parser.parse_args(argv)
    if not args.history_path and not args.figures and not args.verify and not args.compare:
        parser.error("give --history_path (one or more), --figures, --verify or --compare")
    if args.table and args.figures == bool(args.compare):
        parser.error("--table goes with one of --figures or --compare")
    return args


IMAGE_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")


def check_outputs(args):
    """Every output path, before anything is drawn: a figure's format from its suffix, no folder
    where a file goes, nothing under a file."""
    if args.out:
        suffix = os.path.splitext(args.out)[1].lstrip(".").lower()
        if suffix not in IMAGE_FORMATS:
            raise cli.UserError(f"--out {args.out}: name a .{', .'.join(IMAGE_FORMATS)} file")
        files.check_output_path(args.out, "--out")
    if args.figures:
        files.check_output_path(args.images_dir, "--images_dir", folder=True)
    if args.table:
        files.check_output_path(args.table, "--table")


def student_macs(folder):
    """MACs of the distilled student in `folder` (any model: `prune.model_size`, which counts our
    ResNet50 as model.count_macs does)."""
    import prune

    return prune.model_size(checkpoints.load_model(os.path.join(folder, "model.h5")))[1]


def main(argv=None):
    args = parse_args(argv)
    check_outputs(args)
    cnn_compression.setup()
    if args.history_path:
        out = args.out or os.path.join(os.path.dirname(args.history_path[0]) or ".", "history.png")
        figures.plot_histories(args.history_path, out)
        print(f"wrote {out}")
    rows = results.results_rows(args.model_root, student_macs) if args.figures or args.verify else []
    if args.verify and not rows:
        raise cli.UserError(f"no results under {args.model_root}: no pruning run (summary.json) or finished student")
    tables = []  # --figures' results table, --compare's; --table writes the one asked for (parse_args)
    if args.figures:
        for path in figures.draw_figures(args.model_root, args.images_dir):
            print(f"wrote {path}")
        tables.append(results.format_table(rows))
    if args.compare:
        tables.append(results.format_comparison(results.compare_runs(args.compare)))
    for table in tables:
        print(table)
        if args.table:
            files.write_text(args.table, table + "\n")
    if args.verify:
        reproduction.check_rows(rows, args.data_dir)


if __name__ == "__main__":
    cli.run(main)
