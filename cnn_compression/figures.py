"""The figures: training histories (loss and accuracy per epoch) and the result figures drawn
from the stages' records (`results`): pruning per iteration, channels removed per layer, the
distilled students, accuracy against compression."""

import math
import os

from cnn_compression import files
from cnn_compression import results
from cnn_compression.errors import UserError



def pyplot():
    """matplotlib.pyplot, headless (Agg), in the figures' common style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "font.size": 10})
    return plt


def save_figure(figure, path):
    """Write `figure` to `path` (its format from the extension) atomically, then close it."""
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image_format = os.path.splitext(path)[1].lstrip(".").replace("jpg", "jpeg")
    files.write_atomically(path, lambda temporary: figure.savefig(temporary, format=image_format, bbox_inches="tight"))
    plt.close(figure)


def _label(path):
    parts = os.path.normpath(os.path.dirname(path)).split(os.sep)
    return "/".join(parts[-2:]) if len(parts) > 1 else parts[-1]


LOG_LOSS_RATIO = 5.0  # a loss panel goes to log scale when its largest value exceeds this many medians


def test_images_note(count):
    """How much one test accuracy can be trusted: the image count and one binomial standard error at 90%."""
    if not count:
        return ""
    return f"test accuracy on {count:,} images (one standard error at 90%: {100 * (0.9 * 0.1 / count) ** 0.5:.2f} points)"


def plot_histories(paths, out):
    plt = pyplot()
    histories = [(path, results.read_history(path)) for path in paths]
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
    save_figure(figure, out)
    return figure


def plot_pruning(summary, out, importance="APoZ"):
    plt = pyplot()
    iterations = [entry["iteration"] for entry in summary["iterations"]]
    entries = summary["iterations"]
    figure, accuracy_axis = plt.subplots(figsize=(9, 5.4))
    base = summary["base"]
    series = (("val_acc_pruned", "validation, right after pruning", "C0", ":", "v"),
              ("test_acc_pruned", "test, right after pruning", "C1", ":", "v"),
              ("val_acc", "validation, after fine-tuning", "C0", "-", "o"),
              ("test_acc", "test, after fine-tuning", "C1", "-", "o"))
    # A run begun from a pruned model (--start_model_path) draws that model as iteration 0: the
    # fine-tuned lines start there, as the iterations' compression bars do.
    start = summary.get("start")
    ticks = ([0] if start else []) + iterations
    for key, label, colour, style, marker in series:
        xs, ys = iterations, [100 * e[key] for e in entries]
        if start and key in start:
            xs, ys = [0] + xs, [100 * start[key]] + ys
        accuracy_axis.plot(xs, ys, style, color=colour, marker=marker, label=label)
    if base.get("test_acc") is not None:
        accuracy_axis.axhline(100 * base["test_acc"], color="black", ls="--", lw=1, label="base model, test")
    accuracy_axis.set(xlabel="pruning iteration", ylabel="accuracy (%)", ylim=(0, 100))
    accuracy_axis.set_xticks(ticks, ["start" if tick == 0 else str(tick) for tick in ticks])
    accuracy_axis.set_xlim(min(ticks) - 0.6, max(ticks) + 0.6)
    rate_axis = accuracy_axis.twinx()
    rate_axis.bar(ticks, ([start["compression_rate"]] if start else []) + [e["compression_rate"] for e in entries],
                  color="C2", alpha=0.25, width=0.6, label="compression rate (parameters)")
    rate_axis.set_ylabel("compression rate (x fewer parameters)")
    rate_axis.grid(False)
    accuracy_axis.set_zorder(rate_axis.get_zorder() + 1)
    accuracy_axis.patch.set_visible(False)
    handles = accuracy_axis.get_legend_handles_labels()
    extra = rate_axis.get_legend_handles_labels()
    # Below the axes, so no legend covers a point.
    accuracy_axis.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="upper center",
                         bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    figure.suptitle(f"Iterative {importance} pruning: accuracy and compression per iteration")
    note = test_images_note(results.summary_test_images(summary))
    if note:
        accuracy_axis.set_title(note, fontsize=8, color="0.35")
    figure.tight_layout()
    save_figure(figure, out)
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


def plot_apoz_bars(apoz, out, importance="APoZ"):
    plt = pyplot()
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
    axis.set_title(f"Channels removed per layer and iteration ({importance})")
    axis.view_init(elev=28, azim=-60)
    save_figure(figure, out)
    return figure


def plot_apoz_heatmap(apoz, out, importance="APoZ"):
    import numpy as np

    plt = pyplot()
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
    axis.set_title(f"Channels removed per layer and iteration ({importance})")
    figure.tight_layout()
    save_figure(figure, out)
    return figure


def plot_students(students, teacher, out):
    plt = pyplot()
    names = results.ordered_variants(students)
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
    # The original project's figure for the same kind of model, at its own compression (12.82x students).
    reported = [(index, results.ORIGINAL["teacher" if name == "teacher (pruned)" else name])
                for index, name in enumerate(names) if name == "teacher (pruned)" or name in results.ORIGINAL]
    if reported:
        axis.scatter([index for index, _ in reported], [100 * value[0] for _, value in reported], marker="_", s=900,
                     color="black", linewidths=2, zorder=3, label="original project (reported)")
        axis.legend(fontsize=8, loc="upper left")
    axis.set_xticks(range(len(names)))
    axis.set_xticklabels(names, rotation=15)
    axis.set_ylabel("test accuracy (%)")
    axis.set_ylim(0, max(values + [100 * value[0] for _, value in reported] + [1]) * 1.12)
    axis.set_title("Distilled student by loss terms, against the student alone and its teacher")
    counts = {config["results"].get("test_images")
              or results.DATASET_TEST_IMAGES.get(config.get("arguments", {}).get("dataset")) for config in students.values()} - {None}
    if len(counts) == 1:
        axis.text(0.99, 0.98, test_images_note(counts.pop()), transform=axis.transAxes, ha="right", va="top",
                  fontsize=7, color="0.35")
    figure.tight_layout()
    save_figure(figure, out)
    return figure


def plot_student_curves(students, out):
    """Accuracy per epoch of every finished student, one colour per variant: validation solid,
    training dashed (on augmented images, so below validation early on). Their losses are left out:
    each variant's loss is another sum of terms; the accuracies compare."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(9, 5))
    for index, name in enumerate(results.ordered_variants(students)):
        path = os.path.join(students[name]["folder"], "history.json")
        if not os.path.isfile(path):  # a record kept without its history: no curve to draw
            continue
        history = results.read_history(path)
        for split, style in (("val", "-"), ("train", "--")):
            values = [None if value is None else 100 * value for value in history.get(f"{split}_acc") or []]
            best = max((value for value in values if value is not None), default=None)
            label = f"{name}, {'validation (best %.2f%%)' % best if split == 'val' and best is not None else 'training'}"
            axis.plot(range(1, len(values) + 1), values, style, color=f"C{index}", lw=1.6 if split == "val" else 1,
                      label=label)
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set(xlabel="epoch", ylabel="accuracy (%)", title="The students, epoch by epoch")
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    save_figure(figure, out)
    return figure


def plot_compression(runs, students, out, teacher=None):
    """Test accuracy against compression: the base, each pruning run's iterations as a line, each
    student, and the original project's reported headline points; `teacher` is (run name,
    iteration) of the students' teacher, ringed."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(11, 4.8))
    base = runs[0].summary["base"] if runs else None
    rates = [1.0]
    if base is not None:
        # a base measured without a test set (test_acc None) starts no line; its iterations still draw
        start = [] if base.get("test_acc") is None else [(1.0, 100 * base["test_acc"])]
        if start:
            axis.scatter([1.0], [start[0][1]], s=80, marker="*", color="C3", label="base", zorder=3)
        for index, run in enumerate(runs):  # a run's colour stays its own as later runs fill in
            entries = run.summary["iterations"]
            if not entries:  # started, no iteration finished: nothing to draw but the base
                continue
            first = start  # a run begun from a pruned model (--start_model_path) starts its line there
            if run.summary.get("start", {}).get("test_acc") is not None:
                first = [(run.summary["start"]["compression_rate"], 100 * run.summary["start"]["test_acc"])]
            run_rates = [rate for rate, _ in first] + [e["compression_rate"] for e in entries]
            accuracies = [accuracy for _, accuracy in first] + [100 * e["test_acc"] for e in entries]
            label = "pruning iterations (fine-tuned)" if len(runs) == 1 else f"{run.name}: {run.importance} iterations (fine-tuned)"
            axis.plot(run_rates, accuracies, "-o", color=f"C{index}", ms=4, label=label)
            rates += run_rates
            for entry in entries[4::5]:
                axis.annotate(f"it {entry['iteration']}", (entry["compression_rate"], 100 * entry["test_acc"]),
                              textcoords="offset points", xytext=(4, 4), fontsize=8)
            for entry in entries:
                if teacher == (run.name, entry["iteration"]):
                    axis.scatter([entry["compression_rate"]], [100 * entry["test_acc"]], s=160, facecolors="none",
                                 edgecolors="C3", linewidths=1.5, zorder=4,
                                 label=f"the students' teacher ({run.name}, iteration {entry['iteration']})")
    markers = iter("sD^vP")
    variants = results.ordered_variants(students) if base is not None else []
    for index, name in enumerate(variants):
        measured = students[name]["results"]
        rate = base["parameters"] / measured["parameters"]
        rates.append(rate)
        # Students share one compression rate: spread them sideways (5% apart, on the log axis) and
        # give each accuracy in the legend, so none hides another.
        shown = rate * (1 + 0.05 * (index - (len(variants) - 1) / 2))
        axis.scatter([shown], [100 * measured["test_acc"]], s=50, marker=next(markers, "o"), zorder=3,
                     label=f"student ({rate:.1f}x): {name}, {100 * measured['test_acc']:.2f}%",
                     edgecolors="white", linewidths=0.6)
    original = [results.ORIGINAL[kind] for kind in results.ORIGINAL_POINTS]
    axis.scatter([rate for _, rate in original], [100 * accuracy for accuracy, _ in original], s=45, marker="o",
                 facecolors="none", edgecolors="0.3", linewidths=1.2, zorder=3, label="original project (reported)")
    rates += [rate for _, rate in original]
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    axis.set_xscale("log")
    low, high = min(rates) / 1.15, max(rates) * 1.25
    middle = math.sqrt(low * high)  # the middle of the log axis
    for kind, (accuracy, rate) in zip(results.ORIGINAL_POINTS.values(), original):
        # Labels in the right half go left of their point: rightwards they would run under the legend.
        label_on_the_right = rate <= middle
        axis.annotate(f"{kind} {100 * accuracy:.2f}%", (rate, 100 * accuracy), textcoords="offset points",
                      xytext=(6 if label_on_the_right else -6, -3), ha="left" if label_on_the_right else "right",
                      fontsize=7, color="0.3")
    axis.set_xlim(low, high)
    ticks = [t for t in (1, 1.5, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 500) if low <= t <= high]
    if len(ticks) > 9:  # a wide range: fewer ticks, so no two labels touch
        ticks = [t for t in ticks if t in (1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 500)]
    axis.xaxis.set_major_locator(FixedLocator(ticks))  # every tick drawn gets its label
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    axis.xaxis.set_minor_locator(NullLocator())
    note = test_images_note(results.summary_test_images(runs[0].summary) if runs else None)
    if note:
        axis.text(0.01, 0.01, note, transform=axis.transAxes, ha="left", va="bottom", fontsize=7, color="0.35")
    axis.set_xlabel("compression rate (x fewer parameters than the base, log scale)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title("Test accuracy against compression")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no point hidden
    figure.tight_layout()
    save_figure(figure, out)
    return figure


def draw_figures(model_root, images_dir):
    """Every result figure whose inputs exist; returns the paths written. Each pruning run gets its
    own pruning and channel figures (`pruning_result_taylor.png` for `pruned_taylor`; the default
    `pruned_model` keeps the plain names)."""
    written = []
    runs = results.load_pruning_runs(model_root)
    students = results.load_students(model_root)
    for run in runs:
        if not run.summary.get("iterations"):
            continue
        name = f"pruning_result{run.suffix}.png"
        plot_pruning(run.summary, os.path.join(images_dir, name), run.importance)
        written.append(name)
        if run.records:
            bars, heatmap = f"3d_apoz{run.suffix}.jpg", f"apoz_heatmap{run.suffix}.png"
            plot_apoz_bars(run.records, os.path.join(images_dir, bars), run.importance)
            plot_apoz_heatmap(run.records, os.path.join(images_dir, heatmap), run.importance)
            written += [bars, heatmap]
    if students:
        teacher = next((config["results"]["teacher_test_acc"] for config in students.values()
                        if config["results"].get("teacher_test_acc") is not None), None)
        plot_students(students, teacher, os.path.join(images_dir, "accuracy_result.png"))
        written.append("accuracy_result.png")
        if any(os.path.isfile(os.path.join(config["folder"], "history.json")) for config in students.values()):
            plot_student_curves(students, os.path.join(images_dir, "students_history.png"))
            written.append("students_history.png")
    if runs or students:
        plot_compression(runs, students, os.path.join(images_dir, "compression_result.png"),
                         results.teacher_of(students, runs))
        written.append("compression_result.png")
    if not written:
        raise UserError(f"nothing to draw: no pruning summary or finished distillation run under {model_root}")
    return [os.path.join(images_dir, name) for name in written]
