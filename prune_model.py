"""Stage 2: iterative filter pruning (APoZ by default) that produces a really smaller copy of our
ResNet50 or of any functional Keras classifier.

    python prune_model.py --prune_iter=15
    python prune_model.py --importance taylor --target_compression 3 --criterion fraction --prune_fraction 0.2

Each iteration k scores every channel (--importance, on validation images for apoz and taylor),
selects channels per group (--ranking layer) or across groups (--ranking global), builds the
smaller model (physically fewer filters), records its accuracy right after pruning, fine-tunes it
until validation accuracy stops improving (--patience, ceiling --epoch_num) and writes
<root_folder>/iter{k}/model.h5 (best validation accuracy; model.keras beside it for a model .h5
cannot hold), history.json and apoz.json, then appends the iteration to
<root_folder>/summary.json. With --target_compression or --target_macs the iterations go on
until the target is reached (at most --prune_iter of them), the last one removing only what
reaches it. --start_model_path prunes on from a model an earlier run pruned from the same base
(compression still counted against the base). Rerunning the same command resumes: it continues after the last iteration
summary.json lists (a run that met its target is complete), and an interrupted fine-tuning
resumes from its last finished epoch (the pruned architecture is saved first, as
iter{k}/pruned.h5). With --distill_from (a teacher .h5 or .keras, or 'base': --base_model_path)
each fine-tuning minimises (1 - alpha) * CE + alpha * T^2 * KL(teacher || student), the
distillation stage's backbone loss (docs/pruning.md).

--base_model_path (.h5 or .keras) is our ResNet50 or any functional Keras classifier that takes
32x32x3 raw 0-255 images (preprocessing inside the model) and outputs one row of class scores
(probabilities after a softmax, or logits). Both are pruned alike: channel groups traced off the
graph each iteration (prune.any_model_groups), targets by prune.size_counter, surgery by
prune.prune_groups; see docs/pruning.md and docs/any_model.md.
"""

import os
import re

import cnn_compression
from cnn_compression import checkpoints
from cnn_compression.classifiers import check_any_model  # shared with knowledge_distillation.py
from cnn_compression import cli
from cnn_compression import files
from cnn_compression import stages
from cnn_compression import training
import pruning_iteration

SUMMARY_NAME = "summary.json"
ITERATION_FOLDER = re.compile(r"^iter\d+$")


def target_ratio(text):
    """A reduction factor: base / pruned, above 1."""
    return cli.number(text, float, strictly_above=1)


def parse_args(argv=None):
    parser = cli.Parser(description="Iteratively prune a ResNet50 (or any functional Keras classifier) by channel "
                                    "importance and fine-tune it.")
    parser.add_argument("--root_folder", default="./model/pruned_model")
    parser.add_argument("--base_model_path", default="./model/base_model/model.h5")
    parser.add_argument("--start_model_path", default=None, metavar="PATH",
                        help="prune this model instead of the base: one pruned from --base_model_path (its layers, "
                             "fewer channels), say an earlier run's last iteration, to go on past that run's target; "
                             "compression, the targets, global ranking's floors and --distill_from base still count "
                             "against --base_model_path")
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
    group.add_argument("--ignored_layers", default=None, metavar="NAMES",
                       help="comma-separated layers whose filters are never pruned: the channel groups they make "
                            f"keep every channel (default: {','.join(pruning_iteration.DEFAULT_IGNORED)} where the "
                            "model has it, the stem; '' prunes every group)")
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
                       help="fine-tune every iteration against this frozen teacher (an .h5 or .keras classifier of the base "
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
    if pruning_iteration.target_of(args) and args.criterion != "fraction":
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


def completed_iterations(summary):
    """The iterations summary.json lists, checked to be 1..n in order."""
    iterations = summary.get("iterations", [])
    numbers = [record.get("iteration") for record in iterations]
    if numbers != list(range(1, len(numbers) + 1)):
        raise cli.UserError(f"{SUMMARY_NAME} lists iterations {numbers}, expected 1..n; pass --overwrite to start again")
    return iterations


def format_table(summary):
    base = summary["base"]
    lines = [f"{'iter':>4} {'parameters':>12} {'compr.':>7} {'MACs':>8} {'val pruned':>10} {'val tuned':>9} {'test tuned':>10} {'epochs':>6}",
             f"{'base':>4} {base['parameters']:>12,} {1:>6.2f}x {base['macs'] / 1e6:>7.1f}M {'':>10} {base['val_acc']:>9.4f} {base['test_acc']:>10.4f} {'':>6}"]
    start = summary.get("start")
    if start:  # --start_model_path: the model iteration 1 pruned
        lines.append(f"{'start':>5}{start['parameters']:>12,} {start['compression_rate']:>6.2f}x {start['macs'] / 1e6:>7.1f}M "
                     f"{'':>10} {start['val_acc']:>9.4f} {start['test_acc']:>10.4f} {'':>6}")
    for record in summary["iterations"]:
        lines.append(f"{record['iteration']:>4} {record['parameters']:>12,} {record['compression_rate']:>6.2f}x "
                     f"{record['macs'] / 1e6:>7.1f}M {record['val_acc_pruned']:>10.4f} {record['val_acc']:>9.4f} "
                     f"{record['test_acc']:>10.4f} {record['epochs']:>6}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    cnn_compression.setup()
    from cnn_compression import data

    # Strategy, this worker's folder (a scratch copy on workers other than the chief), precision.
    strategy, args.root_folder = stages.start_stage(args, args.root_folder)
    root = args.root_folder
    summary_path = os.path.join(root, SUMMARY_NAME)
    # Every check that can refuse the run comes before anything in root_folder is touched.
    base_network = checkpoints.load_model(args.base_model_path, "base model")
    check_any_model(base_network, len(data.CLASS_NAMES))
    layer_names = {layer.name for layer in base_network.layers}
    missing = sorted(set(pruning_iteration.ignored_layers(args, base_network)) - layer_names)
    if missing:
        raise cli.UserError(f"--ignored_layers names {', '.join(missing)}, which {args.base_model_path} lacks")
    start_network = None
    if args.start_model_path:
        start_network = checkpoints.load_model(args.start_model_path, "start model (--start_model_path)")
        pruning_iteration.check_pruned_from(start_network, base_network, args)
    teacher = pruning_iteration.load_teacher(args, base_network, strategy)
    has_config = os.path.exists(os.path.join(root, "config.json"))
    summary = None
    if not args.overwrite and os.path.isdir(root):
        leftovers = os.path.exists(summary_path) or any(ITERATION_FOLDER.match(name) for name in os.listdir(root))
        if leftovers and not has_config:
            raise cli.UserError(f"{root} holds pruning results without config.json; pass --overwrite to replace them")
        if has_config and os.path.exists(summary_path):
            summary = files.read_json(summary_path, "summary")
    done = completed_iterations(summary) if summary else []
    network = start_network or base_network
    if done:
        last_folder = pruning_iteration.iteration_folder(root, len(done))
        network = checkpoints.load_model(os.path.join(last_folder, "model.h5"), f"iteration {len(done)} model")
    try:
        groups = pruning_iteration.channel_groups(network, args)
        base_widths = pruning_iteration.base_group_widths(base_network, args)
    except ValueError as error:  # a model the trace refuses
        raise cli.UserError(f"cannot trace the channels of {args.base_model_path}: {error}") from None
    pruning_iteration.check_selection(network, groups, args)
    pruning_iteration.check_target(base_network, network, groups, base_widths, args)
    split = stages.load_split(args)
    if args.apoz_samples and args.apoz_samples > len(split.y_val):
        raise cli.UserError(f"--apoz_samples {args.apoz_samples} exceeds the {len(split.y_val)} validation images")
    input_files = {"base_model": args.base_model_path}
    if start_network is not None:
        input_files["start_model"] = args.start_model_path
    if teacher is not None:
        input_files["teacher"] = pruning_iteration.teacher_path(args)
    inputs = stages.input_fingerprints(split, input_files)
    stages.lock_output_folder(root, args.overwrite)
    if args.overwrite and os.listdir(root) not in ([], [files.LOCK_NAME]):
        stages.set_aside_for_overwrite(root, args)  # removed once iteration 1 has fine-tuned an epoch
    if summary is not None and files.read_json(summary_path, "summary") != summary:
        raise cli.UserError(f"{root} changed while this run was starting (another run just finished there); rerun the command")
    state = stages.begin_stage(root, args, ignore=("prune_iter",), inputs=inputs)
    if state == "fresh":
        summary = None
        done = []
    target = pruning_iteration.target_of(args)
    target = {"measure": target[0], "value": target[1]} if target else None
    met = next((record["iteration"] for record in done if pruning_iteration.target_met(record, target)), None)
    if state == "done" and (len(done) >= args.prune_iter or met):
        reason = f"met its target at iteration {met}" if met else f"holds {len(done)} pruning iterations"
        print(f"{root} already {reason} with these arguments: nothing to do")
        print(format_table(summary))
        return
    if state == "done":
        stages.write_config(root, args, complete=False)  # extended with a larger --prune_iter
    for k in range(1, len(done) + 1):  # resume aids of finished iterations
        training.discard_backup(pruning_iteration.iteration_folder(root, k))
        checkpoints.remove_model(os.path.join(pruning_iteration.iteration_folder(root, k), "pruned.h5"))

    class_num = int(base_network.output_shape[-1])
    if summary is None:
        print(f"measuring the base model {args.base_model_path}")
        base = pruning_iteration.describe(base_network, split, args, path=args.base_model_path)
        summary = {"base": base, "iterations": [], "arguments": vars(args)}
        if start_network is not None:
            print(f"measuring the start model {args.start_model_path}")
            start = pruning_iteration.describe(start_network, split, args, path=args.start_model_path)
            start["compression_rate"] = base["parameters"] / start["parameters"]
            start["mac_ratio"] = base["macs"] / start["macs"]
            summary["start"] = start
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
    train_data = data.TrainingData(split.x_train, split.y_train, args.batch_size, args.seed, class_num)
    val_data = data.make_dataset(split.x_val, split.y_val, args.batch_size, class_num=class_num)
    print(f"data: {split.sizes()} from {split.source}; {'resuming after iteration ' + str(len(done)) if done else 'starting'} in {root}")
    for k in range(len(done) + 1, args.prune_iter + 1):
        if met:
            break
        record, network = pruning_iteration.run_iteration(k, network, score_data, split, train_data, val_data,
                                                          summary["base"], base_network, base_widths, args, strategy,
                                                          teacher)
        summary["iterations"].append(record)
        summary["arguments"] = vars(args)
        if pruning_iteration.target_met(record, target):
            met = summary["target"]["met_at_iteration"] = k
        files.write_json(summary_path, summary)  # the iteration counts as complete from here on
        training.discard_backup(pruning_iteration.iteration_folder(root, k))
        checkpoints.remove_model(os.path.join(pruning_iteration.iteration_folder(root, k), "pruned.h5"))
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
