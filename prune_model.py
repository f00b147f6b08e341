"""Stage 2: iterative APoZ filter pruning that produces a really smaller ResNet50.

    python prune_model.py --prune_iter=15

Each iteration k measures APoZ on validation images, selects channels per group, builds the
smaller model (physically fewer filters), records its accuracy right after pruning, fine-tunes it
until validation accuracy stops improving (--patience, ceiling --epoch_num) and writes
<root_folder>/iter{k}/model.h5 (best validation accuracy), history.json and apoz.json, then
appends the iteration to <root_folder>/summary.json. Rerunning the same command resumes: it
continues after the last iteration summary.json lists, and an interrupted fine-tuning resumes from
its last finished epoch (the pruned architecture is saved first, as iter{k}/pruned.h5).
"""

import os
import re
import shutil
import time

import checkpoints
import cli
import files
import multi_worker
import stages
import training

SUMMARY_NAME = "summary.json"
ITERATION_FOLDER = re.compile(r"^iter\d+$")


def parse_args(argv=None):
    parser = cli.Parser(description="Iteratively prune a ResNet50 by APoZ and fine-tune it.")
    parser.add_argument("--root_folder", default="./model/pruned_model")
    parser.add_argument("--base_model_path", default="./model/base_model/model.h5")
    parser.add_argument("--prune_iter", type=cli.positive_int, default=15,
                        help="pruning iterations (a finished run can be extended by rerunning with more)")
    parser.add_argument("--overwrite", action="store_true", help="replace a different or finished run in --root_folder")
    group = parser.add_argument_group("pruning")
    group.add_argument("--criterion", choices=("std", "fraction"), default="std",
                       help="std: remove channels with APoZ > mean + k*std of their layer (the original's rule); "
                            "fraction: remove --prune_fraction of each layer's channels, highest APoZ first")
    group.add_argument("--std_k", type=cli.non_negative_float, default=1.0, help="k of the std criterion")
    group.add_argument("--prune_fraction", type=cli.fraction, default=0.1,
                       help="share of each layer's channels removed per iteration (--criterion fraction)")
    group.add_argument("--prune_residual", action="store_true",
                       help="also prune each stage's residual stream (conv3 + shortcut outputs, scored by the "
                            "mean APoZ of the stage's block outputs)")
    group.add_argument("--min_channels", type=cli.non_negative_int, default=1,
                       help="never keep fewer channels in a layer (0: no floor; emptying a layer is then an error)")
    group.add_argument("--round_to", type=cli.positive_int, default=1,
                       help="round each layer's kept channel count up to a multiple of this")
    group.add_argument("--apoz_samples", type=cli.positive_int, default=None,
                       help="validation images APoZ is measured on (default: all of them)")
    cli.add_data_flags(parser)
    cli.add_training_flags(parser, epoch_num=200, learning_rate=0.01, patience=5)
    return parser.parse_args(argv)


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


def check_selection(network, args):
    """Refuse up front a rule that would empty a layer of `network` whatever the scores (fraction rule, --min_channels 0)."""
    import numpy as np

    import model as resnet
    import prune

    spec = resnet.describe_model(network)[0]
    for group in prune.prunable_groups(args.prune_residual):
        try:
            prune.select_channels(np.zeros(resnet.group_width(spec, group)), name=group["name"], **selection_options(args))
        except prune.EmptyLayerError as error:
            raise cli.UserError(str(error)) from None


def describe(network, split, args, path=None):
    """Parameters, MACs, width spec and validation / test accuracy of `network`."""
    import model as resnet
    from metrics import accuracy

    result = {"model_path": path} if path else {}
    result.update({
        "parameters": resnet.count_parameters(network),
        "macs": resnet.count_macs(network)[1],
        "val_acc": accuracy(network, split.x_val, split.y_val, args.batch_size),
        "test_acc": accuracy(network, split.x_test, split.y_test, args.batch_size),
        "test_images": len(split.y_test),
        "width_spec": resnet.describe_model(network)[0],
    })
    return result


def prune_once(k, network, apoz_images, split, args):
    """APoZ, selection and surgery of iteration k; writes apoz.json, pruned.h5 and pruned.json.

    Nothing is written before the selection has succeeded, so a bad rule leaves the folder alone.
    """
    import model as resnet
    import prune

    started = time.perf_counter()
    folder = iteration_folder(args.root_folder, k)
    groups = prune.prunable_groups(args.prune_residual)
    names = [name for group in groups for name in group["activations"]]
    print(f"iteration {k}: APoZ of {len(groups)} channel groups on {len(apoz_images)} validation images")
    layer_apoz = prune.apoz(network, names, apoz_images, args.batch_size, verbose=args.verbose)
    scores = prune.group_scores(layer_apoz, groups)
    spec = resnet.describe_model(network)[0]
    keep, layers = {}, {}
    for group in groups:
        name = group["name"]
        try:
            keep[name] = prune.select_channels(scores[name], name=name, **selection_options(args))
        except prune.EmptyLayerError as error:
            raise cli.UserError(f"iteration {k}: {error}") from None
        width = resnet.group_width(spec, group)
        layers[name] = {"apoz": scores[name], "kept": keep[name], "removed": prune.removed_channels(width, keep[name]),
                        "width_before": width, "width_after": len(keep[name])}
    shutil.rmtree(folder, ignore_errors=True)  # leftovers of an interrupted attempt are redone, never used
    os.makedirs(folder)
    files.write_json(os.path.join(folder, "apoz.json"),
                        {"iteration": k, "criterion": args.criterion, "selection": selection_options(args),
                         "images": len(apoz_images), "layers": layers})
    pruned = prune.prune_model(network, keep)
    checkpoints.save_model(pruned, os.path.join(folder, "pruned.h5"))
    measured = describe(pruned, split, args)
    state = {"val_acc_pruned": measured["val_acc"], "test_acc_pruned": measured["test_acc"],
             "channels_removed": int(sum(len(layer["removed"]) for layer in layers.values())),
             "seconds": time.perf_counter() - started}
    files.write_json(os.path.join(folder, "pruned.json"), state)  # last: marks pruned.h5 as usable
    return pruned, state


def run_iteration(k, network, apoz_images, split, train_data, val_data, base, args, strategy):
    """One complete iteration; returns its summary.json record and the fine-tuned model."""
    import model as resnet

    folder = iteration_folder(args.root_folder, k)
    paths = {name: os.path.join(folder, name) for name in ("apoz.json", "pruned.h5", "pruned.json")}
    if all(os.path.exists(path) for path in paths.values()):
        pruned = checkpoints.load_model(paths["pruned.h5"], "pruned model")
        state = files.read_json(paths["pruned.json"])
        print(f"iteration {k}: resuming the fine-tuning of {paths['pruned.h5']}")
    else:
        pruned, state = prune_once(k, network, apoz_images, split, args)
    print(f"iteration {k}: {resnet.count_parameters(pruned):,} parameters, {state['channels_removed']} channels removed; "
          f"validation accuracy right after pruning {state['val_acc_pruned']:.4f}; fine-tuning")
    started = time.perf_counter()
    training.set_seed(args.seed + k)
    steps_per_epoch = -(-len(split.y_train) // args.batch_size)
    # Fine-tune a twin built under the strategy (replicated variables) and the precision policy
    # (a loaded pruned.h5 is float32).
    with strategy.scope():
        twin = resnet.rebuild_like(pruned)
    twin.set_weights(pruned.get_weights())
    pruned = twin
    with strategy.scope():
        training.compile_classifier(pruned, args, steps_per_epoch)
    history = training.fit_stage(pruned, train_data, val_data, folder, args, run_folder=args.root_folder)
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
        "width_spec": measured["width_spec"],
    }
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
    import data
    import model as resnet

    strategy = training.distribution_strategy(args)  # before anything starts TensorFlow's runtime
    # Workers other than the chief prune a scratch copy of the folder (same decisions, no shared writes).
    args.root_folder = multi_worker.worker_folder(args.root_folder, strategy)
    root = args.root_folder
    summary_path = os.path.join(root, SUMMARY_NAME)
    args.precision = training.set_precision(args.precision)  # auto resolved, so config.json records what ran
    # Every check that can refuse the run comes before anything in root_folder is touched.
    base_network = checkpoints.load_model(args.base_model_path, "base model")
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
        network = checkpoints.load_model(os.path.join(iteration_folder(root, len(done)), "model.h5"), f"iteration {len(done)} model")
    check_selection(network, args)
    split = data.load_split(args.dataset, args.data_dir, args.train_size, args.seed)
    if args.apoz_samples and args.apoz_samples > len(split.y_val):
        raise cli.UserError(f"--apoz_samples {args.apoz_samples} exceeds the {len(split.y_val)} validation images")
    inputs = {"data": split.fingerprint(), "base_model": files.fingerprint_file(args.base_model_path)}
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
    if state == "done" and len(done) >= args.prune_iter:
        print(f"{root} already holds {len(done)} pruning iterations with these arguments: nothing to do")
        print(format_table(summary))
        return
    if state == "done":
        stages.write_config(root, args, complete=False)  # extended with a larger --prune_iter
    for k in range(1, len(done) + 1):  # resume aids of finished iterations
        training.discard_backup(iteration_folder(root, k))
        stale = os.path.join(iteration_folder(root, k), "pruned.h5")
        if os.path.exists(stale):
            os.remove(stale)

    class_num = resnet.describe_model(base_network)[2]
    if summary is None:
        print(f"measuring the base model {args.base_model_path}")
        summary = {"base": describe(base_network, split, args, path=args.base_model_path), "iterations": [],
                   "arguments": vars(args)}
        files.write_json(summary_path, summary)
    apoz_images = split.x_val
    if args.apoz_samples:
        apoz_images = split.x_val[data.stratified_indices(split.y_val, args.apoz_samples, args.seed)]
    train_data = data.make_dataset(split.x_train, split.y_train, args.batch_size, True, args.seed, class_num)
    val_data = data.make_dataset(split.x_val, split.y_val, args.batch_size, class_num=class_num)
    print(f"data: {split.sizes()} from {split.source}; {'resuming after iteration ' + str(len(done)) if done else 'starting'} in {root}")
    for k in range(len(done) + 1, args.prune_iter + 1):
        record, network = run_iteration(k, network, apoz_images, split, train_data, val_data, summary["base"], args, strategy)
        summary["iterations"].append(record)
        summary["arguments"] = vars(args)
        files.write_json(summary_path, summary)  # the iteration counts as complete from here on
        training.discard_backup(iteration_folder(root, k))
        os.remove(os.path.join(iteration_folder(root, k), "pruned.h5"))
        print(f"iteration {k}: compression {record['compression_rate']:.2f}x, validation accuracy "
              f"{record['val_acc_pruned']:.4f} after pruning, {record['val_acc']:.4f} after fine-tuning; "
              f"test accuracy {record['test_acc']:.4f}")
    last = summary["iterations"][-1] if summary["iterations"] else None
    stages.end_stage(root, args, results={"iterations": len(summary["iterations"]),
                                            "final": {key: last[key] for key in ("parameters", "compression_rate", "val_acc", "test_acc")} if last else None})
    print(format_table(summary))


if __name__ == "__main__":
    cli.run(main)
