"""A stage's life cycle in its output folder: fresh, resumed or already done; then closed with
its test measurement."""

import json
import os

from cnn_compression.checkpoints import load_model
from cnn_compression.cli import UserError
from cnn_compression.files import create_output_folder, read_json, remove_temporaries, set_aside, versions, write_json
from cnn_compression.metrics import loss_and_accuracy
from cnn_compression.training import discard_backup


def check_output_folder(folder):
    """Refuse an output path that is a file, or a folder that holds other runs in its subfolders
    (such as the committed model/kd_model/, whose students each have a folder of their own)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"output folder {folder} exists and is not a folder")
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


def _comparable(arguments, ignore=()):
    return {key: value for key, value in arguments.items() if key not in IGNORED_FOR_RESUME and key not in ignore}


def changed_arguments(previous, args, inputs=None, ignore=()):
    """Names of what differs between a stored config.json and this run: arguments that change the
    result, and the fingerprints of its input files (data, pretrained or base model)."""
    arguments = json.loads(json.dumps(vars(args), default=str))
    before = _comparable(previous.get("arguments", {}), ignore)
    now = _comparable(arguments, ignore)
    # A flag the stored run does not know was added later: that run used its default.
    changed = [key for key in before if before[key] != now.get(key)]
    stored_inputs = previous.get("inputs") or {}
    changed += [f"{name} contents" for name, value in (inputs or {}).items()
                if name in stored_inputs and stored_inputs[name] != value]
    return sorted(changed)


def begin_stage(folder, args, ignore=(), inputs=None):
    """Decide what a stage run does with `folder`: returns "fresh", "resume" or "done".

    Call it once every input is validated, holding the folder's lock (`files.FolderLock`). A
    folder holding a run with other arguments is never touched without --overwrite; with it,
    the old run is moved aside (`set_aside`) and removed only once the new run has finished its
    first epoch. Arguments named in `ignore` may differ on a rerun (e.g. prune_model.py's
    --prune_iter, so a finished run can be extended). `inputs`: {name: fingerprint} of the input
    files, compared in place of their paths.
    """
    check_output_folder(folder)
    create_output_folder(folder)
    remove_temporaries(folder)
    config_path = os.path.join(folder, CONFIG_NAME)
    previous = read_json(config_path, "config") if os.path.exists(config_path) else None
    if previous is not None and getattr(args, "overwrite", False):
        set_aside(folder)
        previous = None
    if previous is not None:
        changed = changed_arguments(previous, args, inputs, ignore)
        if changed:
            raise UserError(
                f"{folder} holds a run with other arguments ({', '.join(changed)}); "
                "pass --overwrite to replace it or choose another folder"
            )
        if previous.get("complete"):
            discard_backup(folder)  # a kill after the stage was marked complete can leave it behind
            return "done"
        return "resume"
    write_config(folder, args, complete=False, inputs=inputs or {})
    return "fresh"


def end_stage(folder, args, **results):
    write_config(folder, args, complete=True, **results)


def open_stage(folder, args, inputs=None):
    """begin_stage for a single-model stage; None (after saying so) when the folder is already done."""
    state = begin_stage(folder, args, inputs=inputs)
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
    discard_backup(folder)
    return results
