"""The records the stages leave, read back: training histories, the pruning summary and its
per-iteration APoZ records, the finished distillation runs, and the results table built from them."""

import difflib
import glob
import os

from cnn_compression import files
from cnn_compression.errors import UserError


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
        raise UserError(f"no history at {path}{hint}")
    history = files.read_json(path, "history")
    if not isinstance(history, dict) or not any(isinstance(history.get(key), list) for key in ("train_loss", "val_loss")):
        raise UserError(f"{path} is not a training history (no train_loss or val_loss lists)")
    return history


DATASET_TEST_IMAGES = {"cifar10": 10000, "sample": 500}  # for records written before test_images was


def summary_test_images(summary):
    """Test images behind a pruning summary's accuracies (recorded since this was added; else the data set's)."""
    base = summary.get("base", {})
    if base.get("test_images"):
        return base["test_images"]
    return DATASET_TEST_IMAGES.get(summary.get("arguments", {}).get("dataset"))


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


def results_rows(model_root, student_macs):
    """Rows (name, test acc, val acc, parameters, compression, MACs) for the base, every pruning
    iteration and every finished student found under model_root.

    `student_macs(folder)`: the MACs of the student saved in `folder` (its model.h5). The pruning
    summary records its models' MACs; a distillation run does not, and how to count them is the
    model's business (plot_train_history.py passes our ResNet50's count).
    """
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
        rate = base["parameters"] / results["parameters"] if base else None
        rows.append((f"student, {name}", results["test_acc"], results.get("best_val_acc"), results["parameters"],
                     rate, student_macs(students[name]["folder"])))
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
