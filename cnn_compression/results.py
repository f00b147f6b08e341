"""The records the stages leave, read back: training histories, every pruning run's summary and
per-iteration importance records, the finished distillation runs, and the results table built from
them, beside what the original project reported."""

import dataclasses
import difflib
import glob
import os
import typing

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
            candidates.append(os.path.relpath(os.path.join(root, "history.json"), folder))
        if root.rstrip(os.sep).count(os.sep) - base_depth >= SUGGESTION_DEPTH:
            folders[:] = []
        else:
            folders[:] = sorted(name for name in folders if not name.startswith("."))
    # Compared below the folder searched, where they differ: a typo (`prued_model`) is close, a
    # history elsewhere is no suggestion (their shared prefix would make any two paths look alike).
    wanted = os.path.relpath(os.path.abspath(path), folder)
    matches = difflib.get_close_matches(wanted, candidates, n=1, cutoff=0.6)
    return os.path.relpath(os.path.join(folder, matches[0])) if matches else None


def read_history(path):
    if not os.path.isfile(path):
        suggestion = nearest_history(path)
        hint = f"; did you mean {suggestion}?" if suggestion else "; no history.json exists under this folder yet"
        raise UserError(f"no history at {path}{hint}")
    history = files.read_json(path, "history")
    if not isinstance(history, dict) or not any(isinstance(history.get(key), list) for key in ("train_loss", "val_loss")):
        raise UserError(f"{path} is not a training history (no train_loss or val_loss lists)")
    for key, values in history.items():
        if (key == "lr" or key.startswith(("train_", "val_"))) and not (
                isinstance(values, list) and all(value is None or isinstance(value, (int, float)) for value in values)):
            raise UserError(f"{path} is not a training history: {key} is not a list of numbers")
    return history


DATASET_TEST_IMAGES = {"cifar10": 10000, "sample": 500}  # for records written before test_images was


def summary_test_images(summary):
    """Test images behind a pruning summary's accuracies (recorded since this was added; else the data set's)."""
    base = summary.get("base", {})
    if base.get("test_images"):
        return base["test_images"]
    return DATASET_TEST_IMAGES.get(summary.get("arguments", {}).get("dataset"))


IMPORTANCE_NAMES = {"apoz": "APoZ", "taylor": "Taylor", "l1": "L1", "bn_scale": "BatchNorm scale", "random": "random"}


@dataclasses.dataclass
class PruningRun:
    """One prune_model.py run under a model root: its folder's name (`pruned_model`, `pruned_taylor`,
    ...), its summary.json, its per-iteration importance records ({iteration: apoz.json}) and the
    folder itself."""

    name: str
    summary: dict
    records: dict
    folder: str = None

    @property
    def importance(self):
        """The criterion's display name (runs recorded before --importance existed were APoZ)."""
        key = self.summary.get("arguments", {}).get("importance") or "apoz"
        return IMPORTANCE_NAMES.get(key, key)

    @property
    def suffix(self):
        """What tells this run's figures apart: nothing for the default folder `pruned_model`, else
        the folder's name without `pruned_` (`_taylor` for `pruned_taylor`)."""
        return "" if self.name == DEFAULT_PRUNING_FOLDER else "_" + self.name.removeprefix("pruned_")


DEFAULT_PRUNING_FOLDER = "pruned_model"


def load_pruning_runs(model_root):
    """Every pruning run directly under model_root (a folder with a summary.json), the default
    `pruned_model` first, then by name."""
    runs = []
    for summary_path in glob.glob(os.path.join(model_root, "*", "summary.json")):
        folder = os.path.dirname(summary_path)
        summary = files.read_json(summary_path, "pruning summary")
        if not isinstance(summary, dict) or "base" not in summary or "iterations" not in summary:
            continue  # another stage's summary, not a pruning run's
        records = {}
        for entry in summary["iterations"]:
            path = os.path.join(folder, f"iter{entry['iteration']}", "apoz.json")
            if os.path.isfile(path):
                records[entry["iteration"]] = files.read_json(path, "importance record")
        runs.append(PruningRun(os.path.basename(folder), summary, records, folder))
    return sorted(runs, key=lambda run: (run.name != DEFAULT_PRUNING_FOLDER, run.name))


def teacher_of(students, runs):
    """(run name, iteration) of the pruning iteration the students were distilled from, or None: the
    students' --root_folder ends in <run folder>/iter<k> (paths are recorded as given, relative to
    where the run started, so only their last two parts are compared), and where both are at hand
    the teacher the student recorded (config.json's inputs) is that iteration's model.h5: a teacher
    outside the root in a folder of the same name is not this run's."""
    by_name = {run.name: run for run in runs}
    for config in students.values():
        root = config.get("arguments", {}).get("root_folder")
        if not root or config.get("arguments", {}).get("no_teacher"):
            continue
        parts = os.path.normpath(root).split(os.sep)
        if len(parts) < 2 or parts[-2] not in by_name or not (parts[-1].startswith("iter") and parts[-1][4:].isdigit()):
            continue
        run, iteration = by_name[parts[-2]], int(parts[-1][4:])
        recorded = (config.get("inputs") or {}).get("teacher")
        model_path = os.path.join(run.folder, f"iter{iteration}", "model.h5") if run.folder else None
        if recorded and model_path and os.path.isfile(model_path) and files.fingerprint_file(model_path) != recorded:
            continue
        return run.name, iteration
    return None


# What the original PyTorch project reported (CIFAR-10 test accuracy, compression in real parameters;
# ../shared/reference/original-project.md): shown beside our rows and as points on the compression figure.
ORIGINAL = {"base": (0.9034, 1.0), "teacher": (0.8591, 3.02), "student alone": (0.6764, 12.82),
            "L_b": (0.7724, 12.82), "L_b + L_inter": (0.7744, 12.82), "L_b + L_inter + L_adv": (0.7601, 12.82)}
# Its headline four, {key in ORIGINAL: label on the figure}: the best student and the student alone.
ORIGINAL_POINTS = {"base": "base", "teacher": "teacher", "L_b + L_inter": "best student", "student alone": "student alone"}


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
    """{variant: config} of every finished distillation run under model_root/kd_model. Two runs of one
    variant (a temperature tried twice, say) are both kept: the second and later are named with
    their folder, `L_b (kd_model/backbone_t8)`."""
    students = {}
    for config_path in sorted(glob.glob(os.path.join(model_root, "kd_model", "**", "config.json"), recursive=True)):
        config = files.read_json(config_path, "config")
        if config.get("complete") and "results" in config:
            config["folder"] = os.path.dirname(config_path)
            name = variant_name(config.get("arguments", {}))
            if name in students:
                name = f"{name} ({os.path.relpath(config['folder'], model_root)})"
            students[name] = config
    return students


class Row(typing.NamedTuple):
    """One model of the results table. `original`: what the original project reported for that kind
    of model, where it reported one, as (test accuracy, compression). `model_path`: the saved model
    that gives `test_acc`, where it is at hand (None where the run kept no file for it); `dataset`
    and `test_images`: the test set it was measured on."""

    name: str
    test_acc: float
    val_acc: float
    parameters: int
    compression: float
    macs: float
    original: tuple = None
    model_path: str = None
    dataset: str = "cifar10"
    test_images: int = None


def saved_file(path):
    """`path` where that file exists, else None."""
    return path if path and os.path.isfile(path) else None


def base_model_file(run, model_root):
    """The base model a pruning run started from, where that very file is at hand: the path its
    summary recorded (relative to where the run was started, usually the repository) or
    model_root/base_model/model.h5, if its fingerprint is the one the run's config.json recorded."""
    recorded = None
    config_path = os.path.join(run.folder, "config.json") if run.folder else None
    if config_path and os.path.isfile(config_path):
        recorded = (files.read_json(config_path, "config").get("inputs") or {}).get("base_model")
    for path in (run.summary["base"].get("model_path"), os.path.join(model_root, "base_model", "model.h5")):
        if saved_file(path) and (recorded is None or files.fingerprint_file(path) == recorded):
            return path
    return None


def results_rows(model_root, student_macs):
    """A Row for the base, every iteration of every pruning run and every finished student found
    under model_root.

    `student_macs(folder)`: the MACs of the student saved in `folder` (its model.h5). The pruning
    summary records its models' MACs; a distillation run does not, and how to count them is the
    model's business (plot_train_history.py passes our ResNet50's count).
    """
    rows = []
    runs = load_pruning_runs(model_root)
    students = load_students(model_root)
    teacher = teacher_of(students, runs)
    base = runs[0].summary["base"] if runs else None
    if base is not None:
        rows.append(Row("base", base.get("test_acc"), base.get("val_acc"), base["parameters"], 1.0, base["macs"],
                        ORIGINAL["base"], base_model_file(runs[0], model_root), **measured_on(runs[0].summary)))
    for run in runs:
        label = "pruned" if len(runs) == 1 else run.name
        for entry in run.summary["iterations"]:
            is_teacher = teacher == (run.name, entry["iteration"])
            model_path = saved_file(run.folder and os.path.join(run.folder, f"iter{entry['iteration']}", "model.h5"))
            rows.append(Row(f"{label}, iteration {entry['iteration']}" + (", the teacher" if is_teacher else ""),
                            entry["test_acc"], entry["val_acc"], entry["parameters"], entry["compression_rate"],
                            entry["macs"], ORIGINAL["teacher"] if is_teacher else None,
                            model_path, **measured_on(run.summary)))
    for name in ordered_variants(students):
        config = students[name]
        results = config["results"]
        rate = base["parameters"] / results["parameters"] if base else None
        rows.append(Row(f"student, {name}", results["test_acc"], results.get("best_val_acc"), results["parameters"],
                        rate, student_macs(config["folder"]), ORIGINAL.get(name),
                        saved_file(os.path.join(config["folder"], "model.h5")),
                        config.get("arguments", {}).get("dataset") or "cifar10", results.get("test_images")))
    return rows


def measured_on(summary):
    """{dataset, test_images} a pruning summary's accuracies were measured on."""
    return {"dataset": summary.get("arguments", {}).get("dataset") or "cifar10", "test_images": summary_test_images(summary)}


def percent(value, missing=""):
    """An accuracy as the tables and reports print it (`missing` where there is none: an empty table
    cell, a report line's "n/a")."""
    return missing if value is None else f"{100 * value:.2f}%"


def format_table(rows):
    lines = ["| model | test accuracy | validation accuracy | parameters | compression | MACs | original project (reported) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, test, val, parameters, rate, macs, original, *_ in rows:
        reported = "" if original is None else f"{percent(original[0])} at {original[1]:g}x"
        lines.append(f"| {name} | {percent(test)} | {percent(val)} | {parameters:,} | "
                     f"{'' if rate is None else f'{rate:.2f}x'} | {macs / 1e6:.2f} M | {reported} |")
    return "\n".join(lines)


# Arguments that differ between any two runs without making them different experiments.
NOT_A_SETTING = ("save_folder", "overwrite", "verbose", "tensorboard")


class ComparedRun(typing.NamedTuple):
    """One finished run of a sweep: its folder (relative to the folder compared), the settings in
    which the sweep's runs differ, and its results."""

    name: str
    settings: dict
    best_val_acc: float
    best_epoch: int
    test_acc: float
    parameters: int


def compare_runs(folder):
    """The finished training runs under `folder` (a base-training or distillation run each: a
    config.json marked complete, with a best validation accuracy), one ComparedRun each, in folder
    order. Their settings are the arguments in which the runs differ, so a sweep's table shows what
    was varied and nothing else."""
    if not os.path.isdir(folder):
        raise UserError(f"--compare {folder}: no such folder")
    configs = []
    for path in sorted(glob.glob(os.path.join(folder, "**", "config.json"), recursive=True)):
        config = files.read_json(path, "config")
        if isinstance(config, dict) and config.get("complete") and "best_val_acc" in (config.get("results") or {}):
            configs.append((os.path.relpath(os.path.dirname(path), folder), config))
    if not configs:
        raise UserError(f"--compare {folder}: no finished run under it (a config.json marked complete, with a best "
                        "validation accuracy)")
    arguments = [config.get("arguments") or {} for _, config in configs]
    keys = sorted({key for run in arguments for key in run} - set(NOT_A_SETTING))
    varied = [key for key in keys if len({repr(run.get(key)) for run in arguments}) > 1]
    return [ComparedRun(name, {key: run.get(key) for key in varied}, config["results"]["best_val_acc"],
                        config["results"].get("best_epoch"), config["results"].get("test_acc"),
                        config["results"].get("parameters"))
            for (name, config), run in zip(configs, arguments)]


def format_comparison(runs):
    """A Markdown table of compare_runs' runs; the best validation accuracy (the one a sweep
    chooses by) in bold."""
    def value(setting):
        return f"{setting:g}" if isinstance(setting, float) else "" if setting is None else str(setting)

    settings = list(runs[0].settings)
    best = max(run.best_val_acc for run in runs)
    lines = ["| " + " | ".join(["run", *settings, "best validation accuracy (epoch)", "test accuracy", "parameters"]) + " |",
             "|---" * (1 + len(settings)) + "|---:|---:|---:|"]
    for run in runs:
        accuracy = percent(run.best_val_acc) + ("" if run.best_epoch is None else f" ({run.best_epoch})")
        if run.best_val_acc == best:
            accuracy = f"**{accuracy}**"
        parameters = "" if run.parameters is None else f"{run.parameters:,}"
        lines.append("| " + " | ".join([run.name, *(value(run.settings[key]) for key in settings), accuracy,
                                         percent(run.test_acc), parameters]) + " |")
    return "\n".join(lines)
