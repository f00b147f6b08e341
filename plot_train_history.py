"""Stage 5: draw training histories and the result figures.

    python plot_train_history.py --history_path=./model/pruned_model/iter1/history.json
    python plot_train_history.py --figures            # every figure under images/ from model/

A history figure shows loss and accuracy (training and validation) per epoch; several
--history_path values overlay on one figure.
"""

import difflib
import glob
import os

from cnn_compression import checkpoints
from cnn_compression import cli
from cnn_compression import files

FIGURE_NAMES = ("pruning_result.png", "3d_apoz.jpg", "apoz_heatmap.png", "accuracy_result.png", "compression_result.png")


def parse_args(argv=None):
    parser = cli.Parser(description="Plot training histories and result figures.")
    parser.add_argument("--history_path", action="append", default=[], help="a history.json (repeat to overlay)")
    parser.add_argument("--out", default=None, help="PNG to write (default: history.png beside the first history)")
    parser.add_argument("--figures", action="store_true", help="draw the result figures from --model_root into --images_dir")
    parser.add_argument("--model_root", default="./model", help="where the stages wrote their folders")
    parser.add_argument("--images_dir", default="./images")
    parser.add_argument("--table", default=None, metavar="PATH",
                        help="with --figures: also write the results table (Markdown) to PATH")
    args = parser.parse_args(argv)
    if not args.history_path and not args.figures:
        parser.error("give --history_path (one or more) or --figures")
    return args


SUGGESTION_DEPTH = 4  # folders below the nearest existing ancestor that the typo search looks into
SUGGESTION_FOLDERS = 5000  # and at most this many folders ...
SUGGESTION_SECONDS = 2.0  # ... for at most this long: a path under / must not walk the whole disk


def nearest_history(path):
    """The existing history.json whose path is closest to `path` (for a typo like `prued_model`).

    Looks below the nearest existing ancestor of `path`, in a bounded neighbourhood (depth,
    folder count and time), so a typo near the file-system root answers at once.
    """
    import time

    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    deadline = time.monotonic() + SUGGESTION_SECONDS
    candidates, visited = [], 0
    base_depth = folder.rstrip(os.sep).count(os.sep)
    for root, folders, names in os.walk(folder):
        visited += 1
        if visited > SUGGESTION_FOLDERS or time.monotonic() > deadline:
            break
        if "history.json" in names:
            candidates.append(os.path.relpath(os.path.join(root, "history.json")))
        if root.rstrip(os.sep).count(os.sep) - base_depth >= SUGGESTION_DEPTH:
            folders[:] = []
        else:
            folders[:] = sorted(name for name in folders if not name.startswith("."))
    matches = difflib.get_close_matches(os.path.relpath(os.path.abspath(path)), candidates, n=1, cutoff=0.0)
    return matches[0] if matches else None


def read_history(path):
    if not os.path.isfile(path):
        suggestion = nearest_history(path)
        hint = f"; did you mean {suggestion}?" if suggestion else "; no history.json exists under this folder yet"
        raise cli.UserError(f"no history at {path}{hint}")
    history = files.read_json(path, "history")
    if not isinstance(history, dict) or not any(isinstance(history.get(key), list) for key in ("train_loss", "val_loss")):
        raise cli.UserError(f"{path} is not a training history (no train_loss or val_loss lists)")
    return history


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "font.size": 10})
    return plt


def _label(path):
    parts = os.path.normpath(os.path.dirname(path)).split(os.sep)
    return "/".join(parts[-2:]) if len(parts) > 1 else parts[-1]


LOG_LOSS_RATIO = 5.0  # a loss panel goes to log scale when its largest value exceeds this many medians


def test_images_note(count):
    """How much one test accuracy can be trusted: the image count and one binomial standard error at 90%."""
    if not count:
        return ""
    return f"test accuracy on {count:,} images (one standard error at 90%: {100 * (0.9 * 0.1 / count) ** 0.5:.2f} points)"


DATASET_TEST_IMAGES = {"cifar10": 10000, "sample": 500}  # for records written before test_images was


def summary_test_images(summary):
    """Test images behind a pruning summary's accuracies (recorded since this was added; else the data set's)."""
    base = summary.get("base", {})
    if base.get("test_images"):
        return base["test_images"]
    return DATASET_TEST_IMAGES.get(summary.get("arguments", {}).get("dataset"))


def plot_histories(paths, out):
    plt = _pyplot()
    histories = [(path, read_history(path)) for path in paths]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (path, history) in enumerate(histories):
        colour = colours[index % len(colours)]
        label = _label(path) if len(histories) > 1 else ""
        for axis, key in ((loss_axis, "loss"), (accuracy_axis, "acc")):
            for split, style in (("train", "-"), ("val", "--")):
                values = history.get(f"{split}_{key}") or []
                epochs = range(1, len(values) + 1)
                scale = 100 if key == "acc" else 1
                points = [None if v is None else v * scale for v in values]
                axis.plot(epochs, points, style, color=colour, marker="." if len(values) < 30 else None,
                          label=f"{label} {'training' if split == 'train' else 'validation'}".strip())
    from matplotlib.ticker import MaxNLocator

    losses = [v for _, history in histories for key in ("train_loss", "val_loss") for v in history.get(key) or []
              if v is not None and v > 0]
    # One huge early validation loss (BatchNorm statistics not yet settled) would flatten the rest.
    log_loss = bool(losses) and max(losses) > LOG_LOSS_RATIO * sorted(losses)[len(losses) // 2]
    loss_axis.set(title="Loss" + (" (log scale)" if log_loss else ""), xlabel="epoch", ylabel="cross-entropy loss")
    if log_loss:
        loss_axis.set_yscale("log")
    accuracy_axis.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for axis in (loss_axis, accuracy_axis):
        axis.legend(fontsize=8)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    title = "Training history" if len(histories) > 1 else f"Training history: {_label(paths[0])}"
    figure.suptitle(title)
    figure.tight_layout()
    _save(figure, out)
    return figure


def _save(figure, path):
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    extension = os.path.splitext(path)[1]
    files.write_atomically(path, lambda temporary: figure.savefig(temporary, format=extension.lstrip(".").replace("jpg", "jpeg"),
                                                            bbox_inches="tight"))
    plt.close(figure)


# ---------------------------------------------------------------------------------------------
# Result figures


def load_pruning(model_root):
    summary_path = os.path.join(model_root, "pruned_model", "summary.json")
    if not os.path.isfile(summary_path):
        return None
    summary = files.read_json(summary_path, "pruning summary")
    apoz = {}
    for entry in summary.get("iterations", []):
        path = os.path.join(model_root, "pruned_model", f"iter{entry['iteration']}", "apoz.json")
        if os.path.isfile(path):
            apoz[entry["iteration"]] = files.read_json(path, "APoZ record")
    return summary, apoz


def plot_pruning(summary, out):
    plt = _pyplot()
    iterations = [entry["iteration"] for entry in summary["iterations"]]
    entries = summary["iterations"]
    figure, accuracy_axis = plt.subplots(figsize=(9, 5.4))
    base = summary["base"]
    series = (("val_acc_pruned", "validation, right after pruning", "C0", ":", "v"),
              ("test_acc_pruned", "test, right after pruning", "C1", ":", "v"),
              ("val_acc", "validation, after fine-tuning", "C0", "-", "o"),
              ("test_acc", "test, after fine-tuning", "C1", "-", "o"))
    for key, label, colour, style, marker in series:
        accuracy_axis.plot(iterations, [100 * e[key] for e in entries], style, color=colour, marker=marker, label=label)
    if base.get("test_acc") is not None:
        accuracy_axis.axhline(100 * base["test_acc"], color="black", ls="--", lw=1, label="base model, test")
    accuracy_axis.set(xlabel="pruning iteration", ylabel="accuracy (%)", ylim=(0, 100))
    accuracy_axis.set_xticks(iterations)
    accuracy_axis.set_xlim(min(iterations) - 0.6, max(iterations) + 0.6)
    rate_axis = accuracy_axis.twinx()
    rate_axis.bar(iterations, [e["compression_rate"] for e in entries], color="C2", alpha=0.25, width=0.6,
                  label="compression rate (parameters)")
    rate_axis.set_ylabel("compression rate (x fewer parameters)")
    rate_axis.grid(False)
    accuracy_axis.set_zorder(rate_axis.get_zorder() + 1)
    accuracy_axis.patch.set_visible(False)
    handles = accuracy_axis.get_legend_handles_labels()
    extra = rate_axis.get_legend_handles_labels()
    # Below the axes, so no legend covers a point.
    accuracy_axis.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="upper center",
                         bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    figure.suptitle("Iterative APoZ pruning: accuracy and compression per iteration")
    note = test_images_note(summary_test_images(summary))
    if note:
        accuracy_axis.set_title(note, fontsize=8, color="0.35")
    figure.tight_layout()
    _save(figure, out)
    return figure


def removed_matrix(apoz):
    """(layer names, iterations, channels removed[layer][iteration]) from the per-iteration APoZ records."""
    iterations = sorted(apoz)
    layers = []
    for iteration in iterations:
        for name in apoz[iteration].get("layers", {}):
            if name not in layers:
                layers.append(name)
    counts = [[len(apoz[i].get("layers", {}).get(name, {}).get("removed", [])) for i in iterations] for name in layers]
    return layers, iterations, counts


def _short(name):
    return name.replace("_block", ".").replace("_relu", "").replace("conv", "c")


def plot_apoz_bars(apoz, out):
    plt = _pyplot()
    layers, iterations, counts = removed_matrix(apoz)
    figure = plt.figure(figsize=(11, 6.5))
    axis = figure.add_subplot(projection="3d")
    colours = plt.get_cmap("viridis")
    for layer_index, row in enumerate(counts):
        axis.bar3d([layer_index] * len(iterations), iterations, [0] * len(iterations), 0.7, 0.7, row,
                   color=colours(layer_index / max(1, len(layers) - 1)), shade=True, alpha=0.9)
    axis.set_xticks(range(len(layers)))
    axis.set_xticklabels([_short(name) for name in layers], rotation=90, fontsize=6)
    axis.set_ylabel("pruning iteration")
    axis.set_zlabel("channels removed")
    axis.set_title("Channels removed per layer and iteration (APoZ)")
    axis.view_init(elev=28, azim=-60)
    _save(figure, out)
    return figure


def plot_apoz_heatmap(apoz, out):
    import numpy as np

    plt = _pyplot()
    layers, iterations, counts = removed_matrix(apoz)
    figure, axis = plt.subplots(figsize=(11, 4.5))
    image = axis.imshow(np.array(counts).T, aspect="auto", cmap="magma_r", origin="lower",
                        extent=(-0.5, len(layers) - 0.5, iterations[0] - 0.5, iterations[-1] + 0.5))
    axis.set_xticks(range(len(layers)))
    axis.set_xticklabels([_short(name) for name in layers], rotation=90, fontsize=7)
    axis.set_ylabel("pruning iteration")
    axis.set_xlabel("layer (stage.block_conv)")
    axis.grid(False)
    figure.colorbar(image, ax=axis, label="channels removed")
    axis.set_title("Channels removed per layer and iteration (APoZ)")
    figure.tight_layout()
    _save(figure, out)
    return figure


VARIANT_ORDER = ("student alone", "L_b", "L_b + L_inter", "L_b + L_inter + L_adv")


def variant_name(arguments):
    if arguments.get("no_teacher"):
        return "student alone"
    terms = ["L_b"]
    if arguments.get("lambda2", 0) > 0:
        terms.append("L_inter")
    if arguments.get("lambda3", 0) > 0:
        terms.append("L_adv")
    if arguments.get("lambda1", 0) <= 0:
        terms.remove("L_b")
    return " + ".join(terms)


def ordered_variants(students):
    return [name for name in VARIANT_ORDER if name in students] + sorted(set(students) - set(VARIANT_ORDER))


def load_students(model_root):
    """{variant: config} of every finished distillation run under model_root/kd_model."""
    students = {}
    for config_path in sorted(glob.glob(os.path.join(model_root, "kd_model", "**", "config.json"), recursive=True)):
        config = files.read_json(config_path, "config")
        if config.get("complete") and "results" in config:
            config["folder"] = os.path.dirname(config_path)
            students[variant_name(config.get("arguments", {}))] = config
    return students


def plot_students(students, teacher, out):
    plt = _pyplot()
    names = ordered_variants(students)
    values = [100 * students[name]["results"]["test_acc"] for name in names]
    colours = ["C7"] + ["C0"] * (len(names) - 1) if names and names[0] == "student alone" else ["C0"] * len(names)
    if teacher is not None:
        names.append("teacher (pruned)")
        values.append(100 * teacher)
        colours.append("C3")
    figure, axis = plt.subplots(figsize=(8.5, 4.5))
    bars = axis.bar(range(len(names)), values, color=colours)
    for bar, value in zip(bars, values):
        axis.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=9)
    axis.set_xticks(range(len(names)))
    axis.set_xticklabels(names, rotation=15)
    axis.set_ylabel("test accuracy (%)")
    axis.set_ylim(0, max(values + [1]) * 1.12)
    axis.set_title("Distilled student by loss terms, against the student alone and its teacher")
    counts = {config["results"].get("test_images")
              or DATASET_TEST_IMAGES.get(config.get("arguments", {}).get("dataset")) for config in students.values()} - {None}
    if len(counts) == 1:
        axis.text(0.99, 0.98, test_images_note(counts.pop()), transform=axis.transAxes, ha="right", va="top",
                  fontsize=7, color="0.35")
    figure.tight_layout()
    _save(figure, out)
    return figure


def plot_compression(summary, students, out):
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8.5, 4.8))
    base = summary["base"] if summary else None
    if base is not None:
        axis.scatter([1.0], [100 * base["test_acc"]], s=80, marker="*", color="C3", label="base", zorder=3)
        entries = summary["iterations"]
        rates = [1.0] + [e["compression_rate"] for e in entries]
        accuracies = [100 * base["test_acc"]] + [100 * e["test_acc"] for e in entries]
        axis.plot(rates, accuracies, "-o", color="C0", ms=4, label="pruning iterations (fine-tuned)")
        for entry in entries[4::5]:
            axis.annotate(f"it {entry['iteration']}", (entry["compression_rate"], 100 * entry["test_acc"]),
                          textcoords="offset points", xytext=(4, 4), fontsize=8)
    markers = iter("sD^vP")
    variants = ordered_variants(students) if base is not None else []
    rates = [1.0] + ([e["compression_rate"] for e in summary["iterations"]] if summary else [])
    for index, name in enumerate(variants):
        results = students[name]["results"]
        rate = base["parameters"] / results["parameters"]
        rates.append(rate)
        # Students share one compression rate: spread them sideways (a few percent, on the log axis)
        # and give each accuracy in the legend, so none hides another.
        shown = rate * (1 + 0.1 * (index - (len(variants) - 1) / 2))
        axis.scatter([shown], [100 * results["test_acc"]], s=50, marker=next(markers, "o"), zorder=3,
                     label=f"student ({rate:.1f}x): {name}, {100 * results['test_acc']:.2f}%",
                     edgecolors="white", linewidths=0.6)
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    axis.set_xscale("log")
    low, high = min(rates) / 1.15, max(rates) * 1.25
    axis.set_xlim(low, high)
    ticks = [t for t in (1, 1.5, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 500) if low <= t <= high]
    axis.xaxis.set_major_locator(FixedLocator(ticks))  # every tick drawn gets its label
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    axis.xaxis.set_minor_locator(NullLocator())
    note = test_images_note(summary_test_images(summary) if summary else None)
    if note:
        axis.text(0.01, 0.01, note, transform=axis.transAxes, ha="left", va="bottom", fontsize=7, color="0.35")
    axis.set_xlabel("compression rate (x fewer parameters than the base, log scale)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title("Test accuracy against compression")
    axis.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    _save(figure, out)
    return figure


def results_rows(model_root):
    """Rows (name, test acc, val acc, parameters, compression, MACs) for the base, every pruning
    iteration and every finished student found under model_root."""
    import model as resnet

    rows = []
    pruning = load_pruning(model_root)
    base = pruning[0]["base"] if pruning else None
    if base is not None:
        rows.append(("base", base.get("test_acc"), base.get("val_acc"), base["parameters"], 1.0, base["macs"]))
        for entry in pruning[0].get("iterations", []):
            rows.append((f"pruned, iteration {entry['iteration']}", entry["test_acc"], entry["val_acc"],
                         entry["parameters"], entry["compression_rate"], entry["macs"]))
    students = load_students(model_root)
    for name in ordered_variants(students):
        results = students[name]["results"]
        student = checkpoints.load_model(os.path.join(students[name]["folder"], "model.h5"), check=resnet.describe_model)
        rate = base["parameters"] / results["parameters"] if base else None
        rows.append((f"student, {name}", results["test_acc"], results.get("best_val_acc"), results["parameters"],
                     rate, resnet.count_macs(student)[1]))
    return rows


def format_table(rows):
    def percent(value):
        return "" if value is None else f"{100 * value:.2f}%"

    lines = ["| model | test accuracy | validation accuracy | parameters | compression | MACs |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, test, val, parameters, rate, macs in rows:
        lines.append(f"| {name} | {percent(test)} | {percent(val)} | {parameters:,} | "
                     f"{'' if rate is None else f'{rate:.2f}x'} | {macs / 1e6:.2f} M |")
    return "\n".join(lines)


def draw_figures(model_root, images_dir):
    """Every result figure whose inputs exist; returns the paths written."""
    written = []
    pruning = load_pruning(model_root)
    students = load_students(model_root)
    summary = pruning[0] if pruning else None
    if summary and summary.get("iterations"):
        plot_pruning(summary, os.path.join(images_dir, "pruning_result.png"))
        written.append("pruning_result.png")
        if pruning[1]:
            plot_apoz_bars(pruning[1], os.path.join(images_dir, "3d_apoz.jpg"))
            plot_apoz_heatmap(pruning[1], os.path.join(images_dir, "apoz_heatmap.png"))
            written += ["3d_apoz.jpg", "apoz_heatmap.png"]
    if students:
        teacher = next((config["results"]["teacher_test_acc"] for config in students.values()
                        if config["results"].get("teacher_test_acc") is not None), None)
        plot_students(students, teacher, os.path.join(images_dir, "accuracy_result.png"))
        written.append("accuracy_result.png")
    if summary or students:
        plot_compression(summary, students, os.path.join(images_dir, "compression_result.png"))
        written.append("compression_result.png")
    if not written:
        raise cli.UserError(f"nothing to draw: no pruning summary or finished distillation run under {model_root}")
    return [os.path.join(images_dir, name) for name in written]


def main(argv=None):
    args = parse_args(argv)
    if args.history_path:
        out = args.out or os.path.join(os.path.dirname(args.history_path[0]) or ".", "history.png")
        plot_histories(args.history_path, out)
        print(f"wrote {out}")
    if args.figures:
        for path in draw_figures(args.model_root, args.images_dir):
            print(f"wrote {path}")
        table = format_table(results_rows(args.model_root))
        print(table)
        if args.table:
            files.write_text(args.table, table + "\n")


if __name__ == "__main__":
    cli.run(main)
