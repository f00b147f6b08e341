"""One iteration of the pruning stage (prune_model.py): the run's channel groups, scoring,
selection (to a target), surgery, fine-tuning (optionally against a teacher), and its records.

The same for our ResNet50 and any functional classifier: groups by prune.any_model_groups, sizes
by prune.size_counter, surgery by prune.prune_groups. `args` is prune_model.py's parsed flags.
"""

import os
import shutil
import time

from cnn_compression import channel_selection
from cnn_compression import checkpoints
from cnn_compression import cli
from cnn_compression import files
from cnn_compression import training


TARGET_FLAGS = {"target_compression": "compression_rate", "target_macs": "mac_ratio"}  # flag -> summary.json measure
# Left whole unless --ignored_layers says otherwise: the stem of our ResNet50 (and of keras.applications'
# ResNets), as the original method pruned only the blocks' conv1 and conv2.
DEFAULT_IGNORED = ("conv1_conv",)


def teacher_path(args):
    """The --distill_from model file ('base': the run's own base model), or None."""
    if args.distill_from is None:
        return None
    return args.base_model_path if args.distill_from == "base" else args.distill_from


def load_teacher(args, base_network, strategy):
    """The --distill_from teacher, built under `strategy` and recast to the precision policy
    (saved models are float32), or None. Refuses one that cannot teach the base model's student:
    not a single-output classifier, another class count or input shape."""
    path = teacher_path(args)
    if path is None:
        return None
    # loaded again for 'base': the teacher is frozen, the base model stays as it is
    teacher = checkpoints.working_copy(checkpoints.load_model(path, "teacher model (--distill_from)"), strategy)
    outputs = teacher.output_shape
    if isinstance(outputs, list) or len(outputs) != 2:
        raise cli.UserError(f"--distill_from {path} outputs {outputs}: a teacher must give one row of class scores")
    if outputs[-1] != base_network.output_shape[-1]:
        raise cli.UserError(f"--distill_from {path} scores {outputs[-1]} classes, the base model "
                            f"{base_network.output_shape[-1]}: a teacher must have the student's classes")
    if teacher.input_shape != base_network.input_shape:
        raise cli.UserError(f"--distill_from {path} takes input {teacher.input_shape}, the base model "
                            f"{base_network.input_shape}: a teacher must see the student's images")
    return teacher


def distiller(student, teacher, args, steps_per_epoch):
    """The fine-tuning model of --distill_from: the distillation stage's Distiller with its
    backbone term alone, (1 - alpha) * CE + alpha * T^2 * KL, compiled. It fits `student` and
    validates it alone (plain cross-entropy and accuracy); `student` is the model to save."""
    import distillation

    model = distillation.Distiller(student, teacher, lambdas=(1.0, 0.0, 0.0), temperature=args.distill_temperature,
                                   kd_beta=args.distill_alpha, label_smoothing=args.label_smoothing)
    model.compile(optimizer=training.make_optimizer(args, steps_per_epoch))
    return model


def target_of(args):
    """(summary.json measure, ratio) of the target flag given, or None."""
    for flag, measure in TARGET_FLAGS.items():
        if getattr(args, flag, None) is not None:
            return measure, getattr(args, flag)
    return None


def target_met(record, target):
    return target is not None and record[target["measure"]] >= target["value"] * (1 - 1e-12)


def iteration_folder(root, k):
    return os.path.join(root, f"iter{k}")


def selection_options(args):
    return {"criterion": args.criterion, "std_k": args.std_k, "fraction": args.prune_fraction,
            "min_channels": args.min_channels, "round_to": args.round_to}


def ignored_layers(args, network):
    """The layers --ignored_layers names (DEFAULT_IGNORED, those `network` has, when not given)."""
    if args.ignored_layers is None:
        return [name for name in DEFAULT_IGNORED if name in {layer.name for layer in network.layers}]
    return [name.strip() for name in args.ignored_layers.split(",") if name.strip()]


def channel_groups(network, args):
    """The traced channel groups this run prunes in `network` (prune.any_model_groups): every
    unfrozen group, residual streams with --prune_residual, none made by --ignored_layers."""
    import prune

    return prune.any_model_groups(network, args.prune_residual, ignored_layers(args, network))


def check_pruned_from(start_network, base_network, args):
    """Refuse a --start_model_path that is not a pruned copy of the base: its layers must be the
    base's (names and kinds, in order) and each group this run prunes no wider than in the base,
    since compression and global ranking's floors are counted against the base's groups."""
    from cnn_compression.classifiers import check_any_model

    check_any_model(start_network, int(base_network.output_shape[-1]))
    layers = [(layer.name, type(layer).__name__) for layer in start_network.layers]
    if layers != [(layer.name, type(layer).__name__) for layer in base_network.layers]:
        raise cli.UserError(f"--start_model_path {args.start_model_path} was not pruned from --base_model_path "
                            f"{args.base_model_path}: their layers differ")
    base_widths = base_group_widths(base_network, args)
    groups = channel_groups(start_network, args)
    keys = channel_selection.stable_keys(groups)
    wider = [group["name"] for group in groups
             if keys[group["name"]] not in base_widths or group["width"] > base_widths[keys[group["name"]]]]
    if wider:
        raise cli.UserError(f"--start_model_path {args.start_model_path} was not pruned from --base_model_path "
                            f"{args.base_model_path}: channel group(s) {', '.join(wider[:3])} are not the base's or wider")
    target = target_of(args)
    if target is not None:  # nothing left to prune for: refused, as a run that met its target has nothing to do
        (base_parameters, base_macs), (parameters, macs) = size_of(base_network), size_of(start_network)
        reached = base_parameters / parameters if target[0] == "compression_rate" else base_macs / macs
        if reached >= target[1] * (1 - 1e-12):
            flag = "--target_compression" if target[0] == "compression_rate" else "--target_macs"
            raise cli.UserError(f"--start_model_path {args.start_model_path} is already at {reached:.2f}x of the base, "
                                f"past {flag} {target[1]:g}")


def from_logits(network):
    """True unless the model ends in a softmax (our ResNet50 does): its output is then logits.
    Any spelling of the softmax (see channel_importance.classifier_head)."""
    from cnn_compression import channel_importance

    return not channel_importance.ends_in_softmax(network)


def check_selection(network, groups, args):
    """Refuse up front a rule that would empty a layer of `network` whatever the scores (fraction
    rule, --min_channels 0), or one whose floor leaves nothing to remove. Global ranking never
    empties one (its floor is at least a channel)."""
    import numpy as np

    if not groups:
        raise cli.UserError(f"{network.name} has no channel group this run may prune"
                            + ("" if args.prune_residual else " (add --prune_residual for residual streams)"))
    needs = {"apoz": ("activations", "a ReLU-family output"), "taylor": ("activations", "a ReLU-family output")}
    if args.importance in needs:
        role, what = needs[args.importance]
        if not any(group[role] for group in groups):
            raise cli.UserError(f"--importance {args.importance} scores no channel group of {network.name}: none has "
                                f"{what}; choose l1, bn_scale or random")
    if args.ranking == "global":
        return
    widest = max(group["width"] for group in groups)
    if args.min_channels >= widest:  # every iteration would remove nothing, after scoring and fine-tuning
        raise cli.UserError(f"--min_channels {args.min_channels} is at least the width of every channel group "
                            f"(the widest has {widest}): nothing to prune")
    for group in groups:
        try:
            channel_selection.select_channels(np.zeros(group["width"]), name=group["name"], **selection_options(args))
        except channel_selection.EmptyLayerError as error:
            raise cli.UserError(str(error)) from None


def base_group_widths(base_network, args):
    """{stable key (channel_selection.stable_keys): width} of the groups this run prunes in the base model."""
    groups = channel_groups(base_network, args)
    keys = channel_selection.stable_keys(groups)
    return {keys[group["name"]]: group["width"] for group in groups}


def floors(base_widths, groups, args):
    """{group name: fewest channels the selection can leave}, never above the current width.
    `base_widths`: base_group_widths of the base model (global ranking's floor is a share of it)."""
    return channel_selection.group_floors(groups, base_widths, args.ranking, args.min_channels, args.round_to)


def size_of(network):
    """(parameters, MACs) of `network` (model.count_macs's convention, for any model)."""
    import prune

    return prune.model_size(network)


def predictor(base_network, network, groups, measure):
    """{group name: width} -> predicted base / pruned ratio (`measure`) of `network` resized so."""
    import prune

    position = 0 if measure == "compression_rate" else 1
    base = size_of(base_network)[position]
    count = prune.size_counter(network, groups)
    return lambda widths: base / count(widths)[position]


def check_target(base_network, network, groups, base_widths, args):
    """Refuse up front a target that even every group the run prunes at its floor would not reach:
    a group the criterion cannot score keeps its channels, so it stays whole here too."""
    from cnn_compression import channel_importance

    target = target_of(args)
    if target is None:
        return
    measure, value = target
    floor = floors(base_widths, groups, args)  # of every group: split groups are ranked among all
    scored = channel_importance.scored_groups(args.importance, network, groups)
    widths = {group["name"]: floor[group["name"]] for group in scored}
    best = predictor(base_network, network, groups, measure)(widths)
    if best < value:
        flag = "--target_compression" if measure == "compression_rate" else "--target_macs"
        what = "inner and residual" if args.prune_residual else "inner (add --prune_residual for more)"
        unscored = len([group for group in groups if not group["frozen"]]) - len(scored)
        kept = f" ({unscored} group(s) --importance {args.importance} cannot score keep their channels)" if unscored else ""
        raise cli.UserError(f"{flag} {value:g} is out of reach: every {what} channel group at its floor gives "
                            f"{best:.2f}x{kept}")


def describe(network, split, args, path=None):
    """Parameters, MACs, {group: width} of every prunable group, validation / test accuracy of
    `network`, and for our ResNet50 its width spec too (model.describe_model), as its records have
    always had: metadata, nothing in the stage reads it back."""
    from cnn_compression.metrics import accuracies
    import prune

    parameters, macs = size_of(network)
    measured = accuracies(network, {"val": (split.x_val, split.y_val), "test": (split.x_test, split.y_test)},
                          args.batch_size)
    result = {"model_path": path} if path else {}
    result.update({
        "parameters": parameters,
        "macs": macs,
        "val_acc": measured["val"],
        "test_acc": measured["test"],
        "test_images": len(split.y_test),
        "group_widths": {group["name"]: group["width"] for group in prune.any_model_groups(network, residual=True)},
    })
    result.update(width_spec(network))
    return result


def width_spec(network):
    """{"width_spec": spec} of our ResNet50 (model.describe_model), {} of any other model."""
    import model as resnet

    try:
        return {"width_spec": resnet.describe_model(network)[0]}
    except resnet.NotOurResNetError:
        return {}


def select(k, network, groups, scores, base_network, base_widths, args):
    """{group name: channels to keep} of iteration k, for the scored `groups`: the rule per group
    or across groups; with a target, cut down to just reach it. Returns (keep, target record for
    apoz.json or None)."""
    # floors of every group: a split group's base width is found by its rank among all of its layer's
    floor = floors(base_widths, groups, args)
    groups = [group for group in groups if group["name"] in scores]
    if args.ranking == "global":
        keep = channel_selection.select_global(scores, args.criterion, args.std_k, args.prune_fraction,
                                               {group["name"]: floor[group["name"]] for group in groups}, args.round_to)
    else:
        keep = {}
        for group in groups:
            name = group["name"]
            try:
                keep[name] = channel_selection.select_channels(scores[name], name=name, **selection_options(args))
            except channel_selection.EmptyLayerError as error:
                raise cli.UserError(f"iteration {k}: {error}") from None
    target = target_of(args)
    if target is None:
        return keep, None
    measure, value = target
    predict = predictor(base_network, network, groups, measure)
    before = predict({group["name"]: group["width"] for group in groups})
    keep, predicted, cut = channel_selection.select_to_target(scores, keep, predict, value, args.ranking, args.round_to)
    if predicted <= before and predicted < value:
        raise cli.UserError(f"iteration {k}: the rule removes no more channels at {before:.2f}x, short of the target "
                            f"{value:g}x; raise --prune_fraction or lower --min_channels")
    return keep, {"measure": measure, "value": value, "predicted": predicted, "cut": bool(cut),
                  "reached": bool(predicted >= value)}


def prune_once(k, network, score_data, split, base_network, base_widths, args):
    """Scoring, selection and surgery of iteration k; writes apoz.json, pruned.h5 and pruned.json.

    Nothing is written before the selection has succeeded, so a bad rule leaves the folder alone.
    """
    from cnn_compression import channel_importance
    import prune

    started = time.perf_counter()
    folder = iteration_folder(args.root_folder, k)
    groups = channel_groups(network, args)  # traced again each iteration: split groups' names may change
    images, labels = score_data
    measured_on = len(images) if args.importance in ("apoz", "taylor") else 0
    print(f"iteration {k}: {args.importance} importance of {len(groups)} channel groups"
          + (f" on {measured_on} validation images" if measured_on else ""))
    measured = {}
    scores = channel_importance.importance_scores(args.importance, network, groups, images, labels, args.batch_size,
                                                  seed=(args.seed, k), verbose=args.verbose, measured=measured)
    unscored = [group["name"] for group in groups if group["name"] not in scores]
    if unscored:
        print(f"iteration {k}: {len(unscored)} group(s) have no {args.importance} score and keep their channels: "
              + ", ".join(unscored[:5]) + (", ..." if len(unscored) > 5 else ""))
    if not scores:
        raise cli.UserError(f"iteration {k}: the {args.importance} importance scores no channel group of this model; "
                            "choose another --importance (l1 or random score every group)")
    keep, target = select(k, network, groups, scores, base_network, base_widths, args)
    layers = {}
    for group in groups:
        name = group["name"]
        if name not in keep:
            continue
        width = group["width"]
        removed = channel_selection.removed_channels(width, keep[name])
        layers[name] = {"score": scores[name], "kept": keep[name], "removed": removed, "width_before": width,
                        "width_after": len(keep[name])}
        if args.importance == "apoz":
            layers[name]["apoz"] = measured[name]  # the field earlier runs and the figures read
    shutil.rmtree(folder, ignore_errors=True)  # leftovers of an interrupted attempt are redone, never used
    os.makedirs(folder)
    record = {"iteration": k, "importance": args.importance, "criterion": args.criterion, "ranking": args.ranking,
              "selection": selection_options(args), "images": measured_on, "layers": layers}
    if unscored:
        record["unscored"] = unscored
    if target is not None:
        record["target"] = target
    files.write_json(os.path.join(folder, "apoz.json"), record)
    pruned = prune.prune_groups(network, groups, keep)
    checkpoints.save_model(pruned, os.path.join(folder, "pruned.h5"))
    measured = describe(pruned, split, args)
    state = {"val_acc_pruned": measured["val_acc"], "test_acc_pruned": measured["test_acc"],
             "channels_removed": int(sum(len(layer["removed"]) for layer in layers.values())),
             "seconds": time.perf_counter() - started}
    files.write_json(os.path.join(folder, "pruned.json"), state)  # last: marks pruned.h5 as usable
    return pruned, state


def run_iteration(k, network, score_data, split, train_data, val_data, base, base_network, base_widths, args, strategy,
                  teacher=None):
    """One complete iteration; returns its summary.json record and the fine-tuned model.
    `train_data`: a data.TrainingData. `teacher`: --distill_from's model (load_teacher), or None to
    fine-tune on labels alone."""
    folder = iteration_folder(args.root_folder, k)
    paths = {name: os.path.join(folder, name) for name in ("apoz.json", "pruned.h5", "pruned.json")}
    if all(os.path.exists(path) for path in paths.values()):
        pruned = checkpoints.load_model(paths["pruned.h5"], "pruned model")
        state = files.read_json(paths["pruned.json"])
        print(f"iteration {k}: resuming the fine-tuning of {paths['pruned.h5']}")
    else:
        pruned, state = prune_once(k, network, score_data, split, base_network, base_widths, args)
    print(f"iteration {k}: {pruned.count_params():,} parameters, {state['channels_removed']} channels removed; "
          f"validation accuracy right after pruning {state['val_acc_pruned']:.4f}; fine-tuning"
          + (f" against the teacher {teacher_path(args)}" if teacher is not None else ""))
    started = time.perf_counter()
    training.set_seed(args.seed + k)
    steps_per_epoch = train_data.steps_per_epoch
    pruned = checkpoints.working_copy(pruned, strategy)  # pruned.h5 is float32: back in the --precision policy
    with strategy.scope():
        if teacher is None:
            training.compile_classifier(pruned, args, steps_per_epoch, from_logits=from_logits(pruned))
            fitted = pruned
        else:
            fitted = distiller(pruned, teacher, args, steps_per_epoch)
    history = training.fit_stage(fitted, train_data, val_data, folder, args, model_to_save=pruned,
                                 run_folder=args.root_folder)
    best = checkpoints.load_model(os.path.join(folder, "model.h5"))
    measured = describe(best, split, args)
    record = {
        "iteration": k,
        "parameters": measured["parameters"],
        "macs": measured["macs"],
        "compression_rate": base["parameters"] / measured["parameters"],
        "mac_ratio": base["macs"] / measured["macs"],
        "val_acc_pruned": state["val_acc_pruned"],
        "test_acc_pruned": state["test_acc_pruned"],
        "val_acc": measured["val_acc"],
        "test_acc": measured["test_acc"],
        "channels_removed": state["channels_removed"],
        "epochs": len(history.get("val_acc", [])),
        "seconds": state["seconds"] + time.perf_counter() - started,
    }
    record.update({key: measured[key] for key in ("group_widths", "width_spec") if key in measured})
    return record, best


