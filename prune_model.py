"""Stage 2: iterative filter pruning (APoZ by default) that produces a really smaller ResNet50,
or a smaller copy of any functional Keras classifier.

    python prune_model.py --prune_iter=15
    python prune_model.py --importance taylor --target_compression 3 --criterion fraction --prune_fraction 0.2

Each iteration k scores every channel (--importance, on validation images for apoz and taylor),
selects channels per group (--ranking layer) or across groups (--ranking global), builds the
smaller model (physically fewer filters), records its accuracy right after pruning, fine-tunes it
until validation accuracy stops improving (--patience, ceiling --epoch_num) and writes
<root_folder>/iter{k}/model.h5 (best validation accuracy), history.json and apoz.json, then
appends the iteration to <root_folder>/summary.json. With --target_compression or --target_macs
the iterations go on until the target is reached (at most --prune_iter of them), the last one
removing only what reaches it. Rerunning the same command resumes: it continues after the last
iteration summary.json lists (a run that met its target is complete), and an interrupted
fine-tuning resumes from its last finished epoch (the pruned architecture is saved first, as
iter{k}/pruned.h5). With --distill_from (a teacher .h5, or 'base': --base_model_path) each
fine-tuning minimises (1 - alpha) * CE + alpha * T^2 * KL(teacher || student), the distillation
stage's backbone loss (docs/pruning.md).

--base_model_path may also be any functional Keras classifier that takes 32x32x3 raw 0-255
images (preprocessing inside the model) and outputs one row of class scores (probabilities
after a softmax, or logits). Its channel groups are then traced off its graph each iteration
(channel_graph.py) and the surgery is prune.prune_groups; see docs/any_model.md.
"""

import os
import re
import shutil
import time

from cnn_compression import checkpoints
from cnn_compression.classifiers import check_any_model  # shared with knowledge_distillation.py
from cnn_compression import cli
from cnn_compression import files
from cnn_compression import multi_worker
from cnn_compression import stages
from cnn_compression import training

SUMMARY_NAME = "summary.json"
ITERATION_FOLDER = re.compile(r"^iter\d+$")


TARGET_FLAGS = {"target_compression": "compression_rate", "target_macs": "mac_ratio"}  # flag -> summary.json measure


def target_ratio(text):
    """A reduction factor: base / pruned, above 1."""
    return cli.number(text, float, strictly_above=1)


def parse_args(argv=None):
    parser = cli.Parser(description="Iteratively prune a ResNet50 (or any functional Keras classifier) by channel "
                                    "importance and fine-tune it.")
    parser.add_argument("--root_folder", default="./model/pruned_model")
    parser.add_argument("--base_model_path", default="./model/base_model/model.h5")
    parser.add_argument("--prune_iter", type=cli.positive_int, default=15,
                        help="pruning iterations (a finished run can be extended by rerunning with more)")
    parser.add_argument("--overwrite", action="store_true", help="replace a different or finished run in --root_folder")
    group = parser.add_argument_group("pruning")
    # channel_importance.IMPORTANCES, spelled out: importing it loads Keras before the flags are checked
    group.add_argument("--importance", choices=("apoz", "l1", "bn_scale", "taylor", "random"), default="apoz",
                       help="how channels are scored (higher = keep): apoz (1 - APoZ, the original's), l1 (filter L1 "
                            "norm), bn_scale (|BatchNorm gamma|), taylor (first-order Taylor loss change), random (baseline)")
    group.add_argument("--criterion", choices=("std", "fraction"), default="std",
                       help="std: remove channels whose importance is below mean - k*std of their layer (for apoz: "
                            "APoZ above mean + k*std, the original's rule); fraction: remove --prune_fraction of "
                            "each layer's channels, least important first")
    group.add_argument("--ranking", choices=("layer", "global"), default="layer",
                       help="layer: each group on its own; global: channels compared across groups by their score "
                            "divided by their group's mean, never below --min_channels nor 10%% of a group's base width")
    group.add_argument("--std_k", type=cli.non_negative_float, default=1.0, help="k of the std criterion")
    group.add_argument("--prune_fraction", type=cli.fraction, default=0.1,
                       help="share of each layer's channels (--ranking global: of all channels) removed per iteration "
                            "(--criterion fraction); with a target, the step of every iteration but the last")
    group.add_argument("--prune_residual", action="store_true",
                       help="also prune each stage's residual stream (conv3 + shortcut outputs, scored through "
                            "all of them: e.g. apoz by the mean APoZ of the stage's block outputs); any other model: "
                            "also the groups several layers write (tied through an Add or another merge)")
    group.add_argument("--min_channels", type=cli.non_negative_int, default=1,
                       help="never keep fewer channels in a layer (0: no floor; emptying a layer is then an error)")
    group.add_argument("--round_to", type=cli.positive_int, default=1,
                       help="round each layer's kept channel count up to a multiple of this")
    group.add_argument("--apoz_samples", type=cli.positive_int, default=None,
                       help="validation images apoz and taylor are measured on (default: all of them)")
    targets = group.add_mutually_exclusive_group()
    targets.add_argument("--target_compression", type=target_ratio, default=None, metavar="R",
                         help="prune until base parameters / parameters reaches R (> 1), at most --prune_iter "
                              "iterations; the last one removes only what reaches R (needs --criterion fraction)")
    targets.add_argument("--target_macs", type=target_ratio, default=None, metavar="R",
                         help="the same for base MACs / MACs")
    group = parser.add_argument_group("distillation while pruning")
    group.add_argument("--distill_from", default=None, metavar="PATH",
                       help="fine-tune every iteration against this frozen teacher (an .h5 classifier of the base "
                            "model's classes and input; 'base': --base_model_path): (1 - alpha) * CE + alpha * T^2 "
                            "* KL(teacher || student), the distillation stage's backbone loss")
    # None when not distilling, so that config.json shows them unused; the defaults come with --distill_from
    group.add_argument("--distill_alpha", type=unit_interval, default=None,
                       help=f"alpha: the KL term's share (default {DISTILL_ALPHA}: labels and teacher weigh alike)")
    group.add_argument("--distill_temperature", type=cli.positive_float, default=None,
                       help=f"softmax temperature T (default {DISTILL_TEMPERATURE}, the distillation stage's)")
    cli.add_data_flags(parser)
    cli.add_training_flags(parser, epoch_num=200, learning_rate=0.01, patience=5)
    args = parser.parse_args(argv)
    if target_of(args) and args.criterion != "fraction":
        flag = "--target_compression" if args.target_compression else "--target_macs"
        parser.error(f"{flag} needs --criterion fraction: --prune_fraction is the step of each iteration")
    if args.distill_from is None and (args.distill_alpha is not None or args.distill_temperature is not None):
        parser.error("--distill_alpha and --distill_temperature need --distill_from")
    if args.distill_from is not None:
        args.distill_alpha = DISTILL_ALPHA if args.distill_alpha is None else args.distill_alpha
        args.distill_temperature = DISTILL_TEMPERATURE if args.distill_temperature is None else args.distill_temperature
    return args


# The pruned student starts as a copy of (a pruned) teacher: an equal share keeps the labels'
# correction of the teacher's mistakes while the soft targets carry its class similarities
# (T^2 keeps both terms' gradients on one scale). T: the distillation stage's default.
DISTILL_ALPHA = 0.5
DISTILL_TEMPERATURE = 4.0


def unit_interval(text):
    return cli.number(text, float, minimum=0, maximum=1)


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
    import keras

    with strategy.scope():
        # loaded again for 'base': the teacher is frozen, the base model stays as it is
        teacher = checkpoints.load_model(path, "teacher model (--distill_from)")
        teacher = checkpoints.recast(teacher, keras.mixed_precision.global_policy().name)
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


def completed_iterations(summary):
    """The iterations summary.json lists, checked to be 1..n in order."""
    iterations = summary.get("iterations", [])
    numbers = [record.get("iteration") for record in iterations]
    if numbers != list(range(1, len(numbers) + 1)):
        raise cli.UserError(f"{SUMMARY_NAME} lists iterations {numbers}, expected 1..n; pass --overwrite to start again")
    return iterations


def selection_options(args):
    return {"criterion": args.criterion, "std_k": args.std_k, "fraction": args.prune_fraction,
            "min_channels": args.min_channels, "round_to": args.round_to}


def is_resnet(network):
    """Our own ResNet50 (pruned through model.py's width spec), or any other functional model."""
    import model as resnet

    try:
        resnet.describe_model(network)
    except resnet.NotOurResNetError:
        return False
    return True


def channel_groups(network, args):
    """The traced channel groups this run prunes in `network`: for our ResNet50 those of
    model.channel_groups() (inner, and residual with --prune_residual), under its names; for any
    other model every unfrozen group (residual streams with --prune_residual)."""
    import prune

    if is_resnet(network):
        return prune.resnet_groups(network, args.prune_residual)
    return prune.any_model_groups(network, args.prune_residual)


def from_logits(network):
    """True unless the model ends in a softmax (our ResNet50 does): its output is then logits.
    Any spelling of the softmax (see channel_importance.classifier_head)."""
    from cnn_compression import channel_importance

    return not channel_importance.ends_in_softmax(network)


def check_selection(network, groups, args):
    """Refuse up front a rule that would empty a layer of `network` whatever the scores (fraction
    rule, --min_channels 0). Global ranking never empties one (its floor is at least a channel)."""
    import numpy as np

    import prune

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
    for group in groups:
        try:
            prune.select_channels(np.zeros(group["width"]), name=group["name"], **selection_options(args))
        except prune.EmptyLayerError as error:
            raise cli.UserError(str(error)) from None


SPLIT_GROUP = re.compile(r"^(?P<layer>.*)\[(?P<start>\d+):\d+\](?P<repeat>#\d+)?$")  # channel_graph's layer[start:stop]


def stable_keys(groups):
    """{group name: a key that names the same group in the base model and after any pruning}.

    A group that splits a layer's channels is named by its positions, layer[start:stop], which
    shift when channels before it go; its rank among that layer's split groups does not (pruning
    keeps every group, with at least one channel). Other names stay as they are."""
    ranks = {}
    for group in groups:
        match = SPLIT_GROUP.match(group["name"])
        if match:
            ranks.setdefault((match["layer"], match["repeat"] or ""), []).append((int(match["start"]), group["name"]))
    keys = {group["name"]: group["name"] for group in groups}
    for (layer, repeat), members in ranks.items():
        for rank, (_, name) in enumerate(sorted(members)):
            keys[name] = f"{layer}[split {rank}]{repeat}"
    return keys


def base_group_widths(base_network, args):
    """{stable key (see stable_keys): width} of the groups this run prunes in the base model."""
    groups = channel_groups(base_network, args)
    keys = stable_keys(groups)
    return {keys[group["name"]]: group["width"] for group in groups}


def floors(base_widths, groups, args):
    """{group name: fewest channels the selection can leave}, never above the current width.
    `base_widths`: base_group_widths of the base model (global ranking's floor is a share of it)."""
    import prune

    keys = stable_keys(groups)
    result = {}
    for group in groups:
        width = group["width"]
        if args.ranking == "global":
            floor = prune.global_floor(base_widths.get(keys[group["name"]], width), args.min_channels)
        else:
            floor = max(1, args.min_channels)
        result[group["name"]] = min(width, -(-floor // args.round_to) * args.round_to)
    return result


def size_of(network):
    """(parameters, MACs) of `network` (model.count_macs's convention, for any model)."""
    import prune

    return prune.model_size(network)


def predictor(base_network, network, groups, measure):
    """{group name: width} -> predicted base / pruned ratio (`measure`) of `network` resized so."""
    import model as resnet
    import prune

    if is_resnet(network):
        base_spec = resnet.describe_model(base_network)[0]
        spec, stem, class_num, input_shape = resnet.describe_model(network)
        return prune.ratio_predictor(measure, base_spec, spec, stem, class_num, input_shape)
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
    """Parameters, MACs, widths (our ResNet50: its width spec; any other model: {group: width})
    and validation / test accuracy of `network`."""
    import model as resnet
    from cnn_compression.metrics import accuracy

    parameters, macs = size_of(network)
    result = {"model_path": path} if path else {}
    result.update({
        "parameters": parameters,
        "macs": macs,
        "val_acc": accuracy(network, split.x_val, split.y_val, args.batch_size),
        "test_acc": accuracy(network, split.x_test, split.y_test, args.batch_size),
        "test_images": len(split.y_test),
    })
    if is_resnet(network):
        result["width_spec"] = resnet.describe_model(network)[0]
    else:
        import prune

        result["group_widths"] = {group["name"]: group["width"] for group in prune.any_model_groups(network, residual=True)}
    return result


def select(k, network, groups, scores, base_network, base_widths, args):
    """{group name: channels to keep} of iteration k, for the scored `groups`: the rule per group
    or across groups; with a target, cut down to just reach it. Returns (keep, target record for
    apoz.json or None)."""
    import prune

    # floors of every group: a split group's base width is found by its rank among all of its layer's
    floor = floors(base_widths, groups, args)
    groups = [group for group in groups if group["name"] in scores]
    if args.ranking == "global":
        keep = prune.select_global(scores, args.criterion, args.std_k, args.prune_fraction,
                                   {group["name"]: floor[group["name"]] for group in groups}, args.round_to)
    else:
        keep = {}
        for group in groups:
            name = group["name"]
            try:
                keep[name] = prune.select_channels(scores[name], name=name, **selection_options(args))
            except prune.EmptyLayerError as error:
                raise cli.UserError(f"iteration {k}: {error}") from None
    target = target_of(args)
    if target is None:
        return keep, None
    measure, value = target
    predict = predictor(base_network, network, groups, measure)
    before = predict({group["name"]: group["width"] for group in groups})
    keep, predicted, cut = prune.select_to_target(scores, keep, predict, value, args.ranking, args.round_to)
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
    groups = channel_groups(network, args)  # traced again each iteration: any model's group names may change
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
        layers[name] = {"score": scores[name], "kept": keep[name], "removed": prune.removed_channels(width, keep[name]),
                        "width_before": width, "width_after": len(keep[name])}
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
    pruned = prune.prune_model(network, keep) if is_resnet(network) else prune.prune_groups(network, groups, keep)
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
    `teacher`: --distill_from's model (load_teacher), or None to fine-tune on labels alone."""
    import keras

    import model as resnet

    folder = iteration_folder(args.root_folder, k)
    paths = {name: os.path.join(folder, name) for name in ("apoz.json", "pruned.h5", "pruned.json")}
    ours = is_resnet(network)
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
    steps_per_epoch = -(-len(split.y_train) // args.batch_size)
    # Fine-tune a twin built under the strategy (replicated variables) and the precision policy:
    # pruned.h5 is float32 (checkpoints.save_model), so any other model is recast to the policy,
    # its output layers kept float32 as our ResNet50's softmax.
    with strategy.scope():
        if ours:
            twin = resnet.rebuild_like(pruned)
        else:
            twin = checkpoints.recast(pruned, keras.mixed_precision.global_policy().name)
            if twin is pruned:  # already in the policy: still a copy built under the strategy
                twin = keras.models.clone_model(pruned)
    twin.set_weights(pruned.get_weights())
    pruned = twin
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
    for key in ("width_spec", "group_widths"):
        if key in measured:
            record[key] = measured[key]
    return record, best


def format_table(summary):
    base = summary["base"]
    lines = [f"{'iter':>4} {'parameters':>12} {'compr.':>7} {'MACs':>8} {'val pruned':>10} {'val tuned':>9} {'test tuned':>10} {'epochs':>6}",
             f"{'base':>4} {base['parameters']:>12,} {1:>6.2f}x {base['macs'] / 1e6:>7.1f}M {'':>10} {base['val_acc']:>9.4f} {base['test_acc']:>10.4f} {'':>6}"]
    for record in summary["iterations"]:
        lines.append(f"{record['iteration']:>4} {record['parameters']:>12,} {record['compression_rate']:>6.2f}x "
                     f"{record['macs'] / 1e6:>7.1f}M {record['val_acc_pruned']:>10.4f} {record['val_acc']:>9.4f} "
                     f"{record['test_acc']:>10.4f} {record['epochs']:>6}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    from cnn_compression import data

    strategy = training.distribution_strategy(args)  # before anything starts TensorFlow's runtime
    # Workers other than the chief prune a scratch copy of the folder (same decisions, no shared writes).
    args.root_folder = multi_worker.worker_folder(args.root_folder, strategy)
    root = args.root_folder
    summary_path = os.path.join(root, SUMMARY_NAME)
    args.precision = training.set_precision(args.precision)  # auto resolved, so config.json records what ran
    # Every check that can refuse the run comes before anything in root_folder is touched.
    base_network = checkpoints.load_model(args.base_model_path, "base model")
    ours = is_resnet(base_network)
    if not ours:
        check_any_model(base_network, len(data.CLASS_NAMES))
    teacher = load_teacher(args, base_network, strategy)
    has_config = os.path.exists(os.path.join(root, "config.json"))
    summary = None
    if not args.overwrite and os.path.isdir(root):
        leftovers = os.path.exists(summary_path) or any(ITERATION_FOLDER.match(name) for name in os.listdir(root))
        if leftovers and not has_config:
            raise cli.UserError(f"{root} holds pruning results without config.json; pass --overwrite to replace them")
        if has_config and os.path.exists(summary_path):
            summary = files.read_json(summary_path, "summary")
    done = completed_iterations(summary) if summary else []
    network = base_network
    if done:
        network = checkpoints.load_model(os.path.join(iteration_folder(root, len(done)), "model.h5"),
                                         f"iteration {len(done)} model")
    try:
        groups = channel_groups(network, args)
        base_widths = base_group_widths(base_network, args)
    except ValueError as error:  # the graph and model.channel_groups() disagree, or a model the trace refuses
        raise cli.UserError(f"cannot trace the channels of {args.base_model_path}: {error}") from None
    check_selection(network, groups, args)
    check_target(base_network, network, groups, base_widths, args)
    split = data.load_split(args.dataset, args.data_dir, args.train_size, args.seed)
    if args.apoz_samples and args.apoz_samples > len(split.y_val):
        raise cli.UserError(f"--apoz_samples {args.apoz_samples} exceeds the {len(split.y_val)} validation images")
    inputs = {"data": split.fingerprint(), "base_model": files.fingerprint_file(args.base_model_path)}
    if teacher is not None:
        inputs["teacher"] = files.fingerprint_file(teacher_path(args))
    stages.check_output_folder(root)
    files.lock_folder(root)
    if args.overwrite and os.listdir(root) not in ([], [files.LOCK_NAME]):
        files.set_aside(root)  # removed once iteration 1 has fine-tuned an epoch
    if summary is not None and files.read_json(summary_path, "summary") != summary:
        raise cli.UserError(f"{root} changed while this run was starting (another run just finished there); rerun the command")
    state = stages.begin_stage(root, args, ignore=("prune_iter",), inputs=inputs)
    if state == "fresh":
        summary = None
        done = []
    target = target_of(args)
    target = {"measure": target[0], "value": target[1]} if target else None
    met = next((record["iteration"] for record in done if target_met(record, target)), None)
    if state == "done" and (len(done) >= args.prune_iter or met):
        reason = f"met its target at iteration {met}" if met else f"holds {len(done)} pruning iterations"
        print(f"{root} already {reason} with these arguments: nothing to do")
        print(format_table(summary))
        return
    if state == "done":
        stages.write_config(root, args, complete=False)  # extended with a larger --prune_iter
    for k in range(1, len(done) + 1):  # resume aids of finished iterations
        training.discard_backup(iteration_folder(root, k))
        stale = os.path.join(iteration_folder(root, k), "pruned.h5")
        if os.path.exists(stale):
            os.remove(stale)

    class_num = int(base_network.output_shape[-1])
    if summary is None:
        print(f"measuring the base model {args.base_model_path}")
        summary = {"base": describe(base_network, split, args, path=args.base_model_path), "iterations": [],
                   "arguments": vars(args)}
    # the target, and the iteration that met it (None until then); a summary written before
    # targets existed gains the key on resume
    target_record = dict(target, met_at_iteration=met) if target else None
    if "target" not in summary or summary["target"] != target_record:
        summary["target"] = target_record
        files.write_json(summary_path, summary)
    score_data = split.x_val, split.y_val
    if args.apoz_samples:
        chosen = data.stratified_indices(split.y_val, args.apoz_samples, args.seed)
        score_data = split.x_val[chosen], split.y_val[chosen]
    # The augmentation's random ops take their seeds from the global seed when the pipeline is
    # built: seeded here, as the other stages do, not left to whatever ran before (a second run
    # in one process). Its parallel map still hands the draws to batches in no fixed order.
    training.set_seed(args.seed)
    train_data = data.make_dataset(split.x_train, split.y_train, args.batch_size, True, args.seed, class_num)
    val_data = data.make_dataset(split.x_val, split.y_val, args.batch_size, class_num=class_num)
    print(f"data: {split.sizes()} from {split.source}; {'resuming after iteration ' + str(len(done)) if done else 'starting'} in {root}")
    for k in range(len(done) + 1, args.prune_iter + 1):
        if met:
            break
        record, network = run_iteration(k, network, score_data, split, train_data, val_data, summary["base"],
                                        base_network, base_widths, args, strategy, teacher)
        summary["iterations"].append(record)
        summary["arguments"] = vars(args)
        if target_met(record, target):
            met = summary["target"]["met_at_iteration"] = k
        files.write_json(summary_path, summary)  # the iteration counts as complete from here on
        training.discard_backup(iteration_folder(root, k))
        os.remove(os.path.join(iteration_folder(root, k), "pruned.h5"))
        print(f"iteration {k}: compression {record['compression_rate']:.2f}x, validation accuracy "
              f"{record['val_acc_pruned']:.4f} after pruning, {record['val_acc']:.4f} after fine-tuning; "
              f"test accuracy {record['test_acc']:.4f}")
    last = summary["iterations"][-1] if summary["iterations"] else None
    stages.end_stage(root, args, results={"iterations": len(summary["iterations"]), "target": summary["target"],
                                            "final": {key: last[key] for key in ("parameters", "compression_rate", "mac_ratio", "val_acc", "test_acc")} if last else None})
    print(format_table(summary))
    if target and met:
        print(f"target {target['value']:g}x ({target['measure']}) met at iteration {met}")
    elif target:
        print(f"target {target['value']:g}x ({target['measure']}) not met within --prune_iter {args.prune_iter} "
              f"iterations; rerun with a larger --prune_iter to go on")


if __name__ == "__main__":
    cli.run(main)
