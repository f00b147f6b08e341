"""A stage's life cycle: its start-up (distribution strategy, this worker's folder, precision,
checked output folder, data, input fingerprints, folder lock), then in its output folder fresh,
resumed or already done; then closed with its test measurement.

A stage script runs, in this order (train_base_model.py is the plain case):

    strategy, folder = stages.start_stage(args, args.save_folder)
    ...check every other input (models, flags against each other)...
    split = stages.load_split(args)
    inputs = stages.input_fingerprints(split, {"pretrained": path}, student_spec=spec)
    state = stages.enter_stage(folder, args, inputs)   # None: already done, nothing to do
    ...build under strategy.scope(), training.fit_stage...
    stages.close_stage(folder, args, history, split, ...)
"""

import json
import os
from typing import NamedTuple

from cnn_compression import multi_worker
from cnn_compression import training
from cnn_compression.checkpoints import load_model
from cnn_compression.cli import UserError
from cnn_compression.files import (check_output_path, fingerprint_file, lock_folder, read_json, remove_temporaries,
                                   set_aside, versions, write_json)
from cnn_compression.metrics import loss_and_accuracy


# ---------------------------------------------------------------------------------------------
# Start-up


class Start(NamedTuple):
    strategy: object  # the tf.distribute strategy: build and compile models inside its scope()
    folder: str  # where this worker writes


def start_stage(args, folder):
    """The first steps of a stage run, in the order they must come; returns Start(strategy, folder).

    The distribution strategy of --distribute and --cpu_devices comes first (multi-worker training
    sets TensorFlow up, so before any other TensorFlow work); then this worker's output folder
    (`folder` itself, or on a multi-worker worker other than the chief a scratch copy: same
    decisions, no shared writes); then Keras' precision policy, with args.precision resolved from
    auto so that config.json records what ran (`precision_to_resume`); then the output folder is
    checked (read only: nothing is created or touched before every input has been checked).
    """
    strategy = training.distribution_strategy(args)
    folder = multi_worker.worker_folder(folder, strategy)
    args.precision = training.set_precision(precision_to_resume(folder, args) or args.precision)
    check_output_folder(folder, getattr(args, "overwrite", False))
    return Start(strategy, folder)


def precision_to_resume(folder, args):
    """The precision `--precision auto` takes over from the run stored in `folder`: the one it
    recorded, or float32 for a run made before the flag existed (it ran in float32). None for a
    fresh run, --overwrite or an explicit --precision, where auto follows the hardware.

    So a run resumes in the precision it started in, on whatever machine: the hardware would
    otherwise switch an older run to bfloat16 mid-run, or refuse a bfloat16 run elsewhere as
    other arguments. An unreadable config.json is left to `begin_stage` to report.
    """
    if args.precision != "auto" or getattr(args, "overwrite", False):
        return None
    try:
        with open(os.path.join(folder, CONFIG_NAME)) as handle:
            stored = json.load(handle).get("arguments")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(stored, dict):
        return None
    precision = stored.get("precision", "float32")
    return precision if precision in ("float32", "mixed_bfloat16", "mixed_float16") else None


def load_split(args):
    """The data of --dataset, --data_dir, --train_size and --seed (`data.load_split`); a --class_num
    the labels do not fit is refused here, before training, not by the test measurement after it."""
    from cnn_compression import data

    split = data.load_split(args.dataset, args.data_dir, args.train_size, args.seed)
    class_num = getattr(args, "class_num", None)
    if class_num is not None:
        labels = max(int(split.y_train.max()), int(split.y_test.max())) + 1
        if class_num < labels:
            raise UserError(f"--class_num {class_num} is below the data's {labels} classes")
    return split


def input_fingerprints(split, input_files=None, **values):
    """config.json's "inputs", which a resume must find unchanged: the data's fingerprint, each
    file of `input_files` ({name: path}; a None path stays None) by its contents, and `values`
    as they are (e.g. a student's width spec)."""
    inputs = {"data": split.fingerprint()}
    for name, path in (input_files or {}).items():
        inputs[name] = None if path is None else fingerprint_file(path)
    inputs.update(values)
    return inputs


def enter_stage(folder, args, inputs, ignore=()):
    """Lock `folder` (held until the process ends) and open the stage in it: "fresh" or
    "resume", or None, after saying so, when it already holds this run finished. Call it once
    every input has been checked; `inputs` from `input_fingerprints`, `ignore` as `begin_stage`'s."""
    lock_output_folder(folder, getattr(args, "overwrite", False))
    return open_stage(folder, args, inputs, ignore)


def lock_output_folder(folder, overwrite=False):
    """A stage's first write: check `folder` again (another run may have filled it while the
    inputs were loaded; `start_stage` checked it first), then create it and hold its lock."""
    check_output_folder(folder, overwrite)
    lock_folder(folder)


# ---------------------------------------------------------------------------------------------
# The output folder


# What a stage writes beside its config.json: found without one, they are results of something
# else (a pruning iteration's folder, a copy), which only --overwrite may replace.
STAGE_OUTPUTS = ("model.h5", "model.keras", "history.json", "summary.json", "backup")


def results_without_config(folder):
    """The stage outputs in `folder` when it has no config.json (else none)."""
    if not os.path.isdir(folder) or os.path.exists(os.path.join(folder, CONFIG_NAME)):
        return []
    return [name for name in STAGE_OUTPUTS if os.path.exists(os.path.join(folder, name))]


def check_output_folder(folder, overwrite=False):
    """Refuse an output path that is a file, a folder that holds other runs in its subfolders
    (such as the committed model/kd_model/, whose students each have a folder of their own), or,
    without --overwrite, one that holds results but no config.json."""
    check_output_path(folder, "output folder", folder=True)
    found = results_without_config(folder)
    if found and not overwrite:
        raise UserError(f"{folder} holds results without config.json ({', '.join(found)}), not a run of this "
                        "stage; pass --overwrite to replace them or choose another folder")
    refuse_folder_of_runs(folder)


def refuse_folder_of_runs(folder):
    """Refuse a folder without a config.json of its own whose subfolders hold runs."""
    if os.path.isdir(folder) and not os.path.exists(os.path.join(folder, CONFIG_NAME)):
        nested = sorted(name for name in os.listdir(folder)  # .replaced/ is this folder's own old run
                        if not name.startswith(".") and os.path.isfile(os.path.join(folder, name, CONFIG_NAME)))
        if nested:
            raise UserError(f"{folder} holds other runs in its subfolders ({', '.join(nested[:4])}"
                            f"{' ...' if len(nested) > 4 else ''}); choose a folder of its own for this run")


def write_config(folder, args, **extra):
    """config.json: the arguments, versions and `extra`; the input fingerprints carry over from the file there."""
    path = os.path.join(folder, CONFIG_NAME)
    if "inputs" not in extra and os.path.exists(path):
        extra["inputs"] = read_json(path, "config").get("inputs", {})
    write_json(path, {"arguments": vars(args), "versions": versions(), **extra})


CONFIG_NAME = "config.json"
# Arguments that never make a run "other": how it is shown, and where its files lie. What a path's
# file holds is compared instead, through the fingerprints in config.json's "inputs".
IGNORED_FOR_RESUME = ("verbose", "overwrite", "tensorboard", "data_dir", "model_path", "base_model_path",
                      "root_folder", "save_folder", "teacher_path", "student_path")


def _as_json(values):
    """`values` as config.json holds them (tuples as lists, other objects as strings)."""
    return json.loads(json.dumps(values, default=str))


def _comparable(arguments, ignore=()):
    return {key: value for key, value in arguments.items() if key not in IGNORED_FOR_RESUME and key not in ignore}


def changed_arguments(previous, args, inputs=None, ignore=()):
    """Names of what differs between a stored config.json and this run: arguments that change the
    result, and the fingerprints of its input files (data, pretrained or base model)."""
    before = _comparable(previous.get("arguments", {}), ignore)
    now = _comparable(_as_json(vars(args)), ignore)
    changed = [key for key in before if before[key] != now.get(key)]
    # A flag the stored run does not know was added later: that run had its default, so only a value
    # given otherwise makes this another run (cli.Arguments).
    changed += [key for key in now if key not in before and key in getattr(args, "off_default", ())]
    stored_inputs = previous.get("inputs") or {}
    changed += [f"{name} contents" for name, value in (inputs or {}).items()
                if name in stored_inputs and stored_inputs[name] != value]
    return sorted(changed)


def begin_stage(folder, args, ignore=(), inputs=None):
    """Decide what a stage run does with `folder`: returns "fresh", "resume" or "done".

    Call it once every input is validated, holding the folder's lock (`lock_output_folder`). A
    folder holding a run with other arguments is never touched without --overwrite; with it,
    the old run is moved aside (`set_aside`) and removed only once the new run has finished its
    first epoch. Arguments named in `ignore` may differ on a rerun (e.g. prune_model.py's
    --prune_iter, so a finished run can be extended). `inputs`: {name: fingerprint} of the input
    files, compared in place of their paths.
    """
    remove_temporaries(folder)
    config_path = os.path.join(folder, CONFIG_NAME)
    previous = read_json(config_path, "config") if os.path.exists(config_path) else None
    if getattr(args, "overwrite", False) and (previous is not None or results_without_config(folder)):
        set_aside_for_overwrite(folder, args)
        previous = None
    if previous is not None:
        changed = changed_arguments(previous, args, inputs, ignore)
        if changed:
            raise UserError(
                f"{folder} holds a run with other arguments ({', '.join(changed)}); "
                "pass --overwrite to replace it or choose another folder"
            )
        if previous.get("complete"):
            training.discard_backup(folder)  # a kill after the stage was marked complete can leave it behind
            return "done"
        return "resume"
    write_config(folder, args, complete=False, inputs=inputs or {})
    return "fresh"


# The flags that name a stage's input files (distill_from may also be the word "base").
INPUT_PATH_FLAGS = ("model_path", "base_model_path", "teacher_path", "student_path", "distill_from")


def set_aside_for_overwrite(folder, args):
    """--overwrite: the old run in `folder` moves aside, to be removed once the new run has an epoch
    (`files.set_aside`); refused when one of this run's own input files lies in it."""
    inside = os.path.realpath(folder) + os.sep
    for flag in INPUT_PATH_FLAGS:
        path = getattr(args, flag, None)
        if isinstance(path, str) and os.path.exists(path) and os.path.realpath(path).startswith(inside):
            raise UserError(f"--{flag} {path} lies in the output folder {folder}, whose old run --overwrite would "
                            "remove; move it out or choose another folder")
    set_aside(folder)


def end_stage(folder, args, **results):
    write_config(folder, args, complete=True, **results)


def open_stage(folder, args, inputs=None, ignore=()):
    """begin_stage for a single-model stage; None (after saying so) when the folder is already done."""
    state = begin_stage(folder, args, ignore, inputs)
    if state == "done":
        print(f"{folder} already holds a finished run with these arguments: nothing to do")
        return None
    return state


def close_stage(folder, args, history, split, **extra_results):
    """Measure the stage's best checkpoint on the test set (once, after all choices were made on
    validation), mark the stage complete in config.json and drop the resume backup."""
    best = load_model(os.path.join(folder, "model.h5"))
    test_loss, test_accuracy = loss_and_accuracy(best, split.x_test, split.y_test, args.batch_size)
    valid = [score for score in history["val_acc"] if score is not None]
    results = {"best_val_acc": max(valid), "best_epoch": history["val_acc"].index(max(valid)) + 1,
               "test_acc": test_accuracy, "test_loss": test_loss, "test_images": len(split.y_test), **extra_results}
    end_stage(folder, args, results=results)
    training.discard_backup(folder)
    return results
