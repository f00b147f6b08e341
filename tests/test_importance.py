"""Importance criteria beside APoZ, compression targets and global ranking (issue 14).

Each criterion against a numpy reference on a tiny ResNet50, the target bisection and global
ranking on its traced groups' sizes alone (no model built), one short prune_model.py run to a target, and the flags' refusals.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from cnn_compression import channel_importance
from cnn_compression import channel_selection
from cnn_compression import checkpoints
from cnn_compression import cli
from cnn_compression import files
import model as resnet
import prune
import prune_model
from conftest import REPO, assert_one_line_error, pixel_classifier, run_in_process, run_script

IMAGES = 24
STEM = ["conv1_conv"]  # prune_model.py's default --ignored_layers


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (IMAGES, 32, 32, 3)).astype(np.uint8), rng.integers(0, 10, IMAGES).astype(np.int64)


@pytest.fixture(scope="module")
def groups(network):
    return prune.any_model_groups(network, residual=True, ignored_layers=STEM)


def activation_names(group):
    return [entry["layer"] for entry in group["activations"]]


def stage_producers(stage_index, suffix):
    """The residual stream's producers of one kind: the shortcut's and every block's conv3 `suffix` layer."""
    stage = resnet.STAGE_NAMES[stage_index]
    return [f"{stage}_block1_0_{suffix}"] + [f"{block}_3_{suffix}" for block in resnet.stage_block_names(stage_index)]


def by_hand(network, group, measure, suffix):
    """Reference of a weight-magnitude criterion: one producer as is; a residual stream's
    producers each divided by their mean, then averaged."""
    if not prune.is_residual(group):
        return measure(network.get_layer(group["name"].replace("_relu", f"_{suffix}")))
    stage_index = resnet.STAGE_NAMES.index(group["name"].split("_")[0])
    magnitudes = [measure(network.get_layer(name)) for name in stage_producers(stage_index, suffix)]
    return np.mean([magnitude / magnitude.mean() for magnitude in magnitudes], axis=0)


# ---------------------------------------------------------------------------------------------
# Scoring against numpy


def test_l1_is_the_filter_norm_of_the_producer_convs(network, groups):
    scores = channel_importance.importance_scores("l1", network, groups)
    assert set(scores) == {group["name"] for group in groups}

    def filter_l1(layer):
        kernel = layer.get_weights()[0].astype(np.float64)  # (h, w, in, out)
        return np.array([np.sum(np.abs(kernel[..., out])) for out in range(kernel.shape[-1])])

    for group in groups:
        np.testing.assert_allclose(scores[group["name"]], by_hand(network, group, filter_l1, "conv"), rtol=1e-6,
                                   err_msg=group["name"])
    # a residual stream's producers have their own scales: each has an equal say (mean 1 each, so 1 overall)
    assert scores["conv3_residual"].mean() == pytest.approx(1.0)


def test_bn_scale_is_the_absolute_gamma(network, groups):
    scores = channel_importance.importance_scores("bn_scale", network, groups)

    def gamma(layer):
        return np.abs(layer.get_weights()[0].astype(np.float64))

    for group in groups:
        np.testing.assert_allclose(scores[group["name"]], by_hand(network, group, gamma, "bn"), rtol=1e-6,
                                   err_msg=group["name"])
        assert np.all(scores[group["name"]] >= 0)


def test_apoz_importance_is_one_minus_apoz_and_keeps_the_original_rule(network, groups, batch):
    images, _ = batch
    measured = {}
    scores = channel_importance.importance_scores("apoz", network, groups, images, batch_size=10, measured=measured)  # 24 = 10 + 10 + 4
    # per-layer APoZ is checked against numpy once, in test_prune.py; here: the importance is 1 - the group's APoZ
    names = list(dict.fromkeys(name for group in groups for name in activation_names(group)))
    per_layer = channel_importance.apoz(network, names, images, batch_size=24, verbose=0)
    for group in groups:
        apoz = np.mean([per_layer[name] for name in activation_names(group)], axis=0)
        np.testing.assert_allclose(scores[group["name"]], 1 - apoz, atol=1e-12, err_msg=group["name"])
        np.testing.assert_array_equal(measured[group["name"]], apoz)  # apoz.json's "apoz": as measured
        # the std rule on importances removes exactly what the original removed: APoZ > mean + std
        kept = channel_selection.select_channels(scores[group["name"]], "std", std_k=1.0)
        np.testing.assert_array_equal(kept, np.flatnonzero(~(apoz > apoz.mean() + apoz.std())))


def test_taylor_matches_activation_times_gradient(network, groups, batch):
    images, labels = batch
    scores = channel_importance.importance_scores("taylor", network, groups, images, labels, batch_size=10)  # 24 = 10 + 10 + 4
    # the reference: eager, through the softmax probabilities and Keras' cross-entropy rather than
    # the logits, all images at once; in inference mode images do not interact, so the gradient of
    # the summed loss at image i's activations is that of image i's own loss
    names = list(dict.fromkeys(name for group in groups for name in activation_names(group)))
    features = keras.Model(network.input, [network.get_layer(name).output for name in names] + [network.output])
    loss_function = keras.losses.SparseCategoricalCrossentropy(reduction="sum")
    with tf.GradientTape() as tape:
        *activations, probabilities = features(images.astype("float32"), training=False)
        loss = loss_function(labels, probabilities)
    gradients = tape.gradient(loss, activations)
    products = {name: np.sum(a.numpy().astype(np.float64) * g.numpy(), axis=(1, 2))  # (images, channels)
                for name, a, g in zip(names, activations, gradients)}
    for group in groups:
        reference = np.mean(np.abs(sum(products[name] for name in activation_names(group))), axis=0)
        assert reference.max() > 0, group["name"]
        np.testing.assert_allclose(scores[group["name"]], reference, rtol=2e-3, atol=1e-4 * reference.max(),
                                   err_msg=group["name"])


def test_taylor_is_the_derivative_of_the_loss_in_a_channel_gate(network, groups, batch):
    """Finite differences, in float64: scaling channel c of conv2_block2_2_relu by a gate m (through
    its consumer's input slice) changes each image's loss at rate sum(activation x gradient)."""
    images, labels = batch
    group = next(group for group in groups if group["name"] == "conv2_block2_2_relu")
    scores = channel_importance.importance_scores("taylor", network, [group], images, labels)[group["name"]]
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        precise = resnet.logits_model(resnet.rebuild_like(network))
    finally:
        keras.config.set_dtype_policy(previous)
    precise.set_weights(network.get_weights())
    consumer = precise.get_layer("conv2_block2_3_conv")
    kernel, bias = consumer.get_weights()

    def losses(channel, gate):
        gated = kernel.copy()
        gated[:, :, channel, :] *= gate
        consumer.set_weights([gated, bias])
        output = precise(images.astype("float64"), training=False).numpy()
        output -= output.max(axis=1, keepdims=True)
        return np.log(np.exp(output).sum(axis=1)) - output[np.arange(len(labels)), labels]

    step = 1e-3
    for channel in range(len(scores)):
        derivative = (losses(channel, 1 + step) - losses(channel, 1 - step)) / (2 * step)
        assert np.mean(np.abs(derivative)) == pytest.approx(scores[channel], rel=1e-3, abs=1e-7), channel
    assert scores.max() > 1e-5


def test_random_is_seeded_and_reproducible(network, groups):
    first = channel_importance.importance_scores("random", network, groups, seed=(0, 1))
    again = channel_importance.importance_scores("random", network, groups, seed=(0, 1))
    other_iteration = channel_importance.importance_scores("random", network, groups, seed=(0, 2))
    for group in groups:
        name = group["name"]
        assert len(first[name]) == group["width"]
        np.testing.assert_array_equal(first[name], again[name])
        assert np.all((0 <= first[name]) & (first[name] < 1))
    assert any(not np.array_equal(first[name], other_iteration[name]) for name in first)


def test_importance_scores_refuses_unknown_names_and_missing_images(network, groups):
    with pytest.raises(ValueError, match="unknown importance"):
        channel_importance.importance_scores("l2", network, groups)
    with pytest.raises(ValueError, match="measured on images"):
        channel_importance.importance_scores("taylor", network, groups)
    with pytest.raises(ValueError, match="pass labels"):
        channel_importance.importance_scores("taylor", network, groups, np.zeros((2, 32, 32, 3), np.uint8))


# ---------------------------------------------------------------------------------------------
# Targets and global ranking, on the traced groups' sizes alone (prune.size_counter, no model built)


def random_scores(widths, rng):
    return {name: rng.random(width) for name, width in widths.items()}


@pytest.mark.parametrize("measure, residual, ranking, target", [
    ("compression_rate", False, "layer", 1.5),
    ("compression_rate", False, "layer", 3.0),
    ("mac_ratio", False, "layer", 2.0),
    ("compression_rate", True, "global", 3.0),
    ("mac_ratio", True, "global", 2.5),
])
def test_iterations_stop_at_the_target_within_two_percent(network, measure, residual, ranking, target):
    """Iterate the fraction rule on group widths (no model built) until the target: every iteration
    but the last takes the full step, the last just reaches the target."""
    rng = np.random.default_rng(5)
    groups = prune.any_model_groups(network, residual, STEM)
    position = 0 if measure == "compression_rate" else 1
    count = prune.size_counter(network, groups)
    base = count({})[position]

    def predict(widths):
        return base / count(widths)[position]

    widths = {group["name"]: group["width"] for group in groups}
    floors = {name: channel_selection.global_floor(width) for name, width in widths.items()}
    iterations = 0
    while True:
        iterations += 1
        assert iterations <= 20, "the target was never reached"
        scores = random_scores(widths, rng)
        if ranking == "global":
            step = channel_selection.select_global(scores, "fraction", fraction=0.3, floors=floors)
        else:
            step = {name: channel_selection.select_channels(values, "fraction", fraction=0.3) for name, values in scores.items()}
        keep, predicted, cut = channel_selection.select_to_target(scores, step, predict, target, ranking)
        widths = {name: len(indices) for name, indices in keep.items()}
        full = predict({name: len(indices) for name, indices in step.items()})
        if predicted < target:
            assert not cut and keep == step and predicted == full  # not the last one: the whole step
            continue
        assert full >= target
        break
    assert predict(widths) == predicted
    assert target <= predicted <= 1.02 * target, (iterations, predicted)
    assert iterations >= 2 or target == 1.5
    for name, indices in keep.items():  # the cut keeps a superset of the full step: the most important channels
        assert set(step[name].tolist()) <= set(indices.tolist())
        dropped = channel_selection.removed_channels(len(scores[name]), indices)
        assert len(dropped) == 0 or scores[name][dropped].max() <= scores[name][indices].min()


def test_the_cut_is_the_fewest_removals_that_reach_the_target(network):
    rng = np.random.default_rng(6)
    groups = prune.any_model_groups(network, ignored_layers=STEM)
    count = prune.size_counter(network, groups)

    def predict(widths):
        return count({})[0] / count(widths)[0]

    scores = random_scores({group["name"]: group["width"] for group in groups}, rng)
    step = {name: channel_selection.select_channels(values, "fraction", fraction=0.3) for name, values in scores.items()}
    keep, predicted, cut = channel_selection.select_to_target(scores, step, predict, 1.3)
    assert cut and predicted >= 1.3
    # one channel fewer removed (any group's last removal undone) falls short of the target
    removed_total = sum(len(scores[name]) - len(indices) for name, indices in keep.items())
    order = channel_selection.removal_order(scores, step)
    widths = {name: len(values) for name, values in scores.items()}
    for name in order[:removed_total - 1]:
        widths[name] -= 1
    assert predict(widths) < 1.3
    # proportional: one global fraction s of every group's planned removals r, to the channel
    # (round(s * r) each: (removed - 0.5) / r <= s <= (removed + 0.5) / r for every group)
    planned = {name: len(scores[name]) - len(step[name]) for name in step}
    removed = {name: len(scores[name]) - len(keep[name]) for name in step}
    assert max((removed[n] - 0.5) / planned[n] for n in step) <= min((removed[n] + 0.5) / planned[n] for n in step)
    assert 0 < sum(removed.values()) < sum(planned.values())


def test_global_ranking_compares_normalised_scores_and_respects_floors(groups):
    rng = np.random.default_rng(7)
    scores = random_scores({group["name"]: group["width"] for group in groups}, rng)
    # one group with a single dominant channel: its others are near zero once normalised
    scores["conv5_block1_2_relu"] = np.r_[1000.0, np.full(31, 0.001)]
    floors = {name: channel_selection.global_floor(len(values), min_channels=2) for name, values in scores.items()}
    assert floors["conv5_block1_2_relu"] == 4 and floors["conv2_block1_1_relu"] == 2  # ceil(10% of 32); --min_channels 2
    keep = channel_selection.select_global(scores, "fraction", fraction=0.5, floors=floors)
    total = sum(len(values) for values in scores.values())
    assert sum(len(indices) for indices in keep.values()) == total - round(0.5 * total)
    assert all(len(keep[name]) >= floors[name] for name in keep)
    assert len(keep["conv5_block1_2_relu"]) == floors["conv5_block1_2_relu"] and 0 in keep["conv5_block1_2_relu"]
    # every removed channel scores (normalised) no more than any kept channel of a group above its floor
    normalised = channel_selection.normalised_scores(scores)
    removed = np.concatenate([normalised[name][channel_selection.removed_channels(len(scores[name]), keep[name])]
                              for name in keep])
    above_floor = np.concatenate([normalised[name][keep[name]] for name in keep if len(keep[name]) > floors[name]])
    assert removed.max() <= above_floor.min()
    # normalised: scaling one group's scores changes nothing
    scaled = dict(scores, conv3_block2_1_relu=scores["conv3_block2_1_relu"] * 1e4)
    rescaled = channel_selection.select_global(scaled, "fraction", fraction=0.5, floors=floors)
    assert all(np.array_equal(keep[name], rescaled[name]) for name in keep)
    # round_to rounds kept counts up, never above the width
    rounded = channel_selection.select_global(scores, "fraction", fraction=0.5, floors=floors, round_to=8)
    assert all(len(rounded[name]) % 8 == 0 or len(rounded[name]) == len(scores[name]) for name in rounded)


# ---------------------------------------------------------------------------------------------
# prune_model.py


# float32 whatever the CPU: the in-process rerun below must not switch this process to bfloat16
RUN_FLAGS = ["--dataset", "sample", "--train_size", 200, "--epoch_num", 1, "--batch_size", 100, "--verbose", 0,
             "--precision", "float32"]


@pytest.mark.slow  # make test-all (tests/test_prune_any_model.py runs the stage to a target too)
def test_run_to_a_compression_target(base_path, tmp_path, capfd):
    root = tmp_path / "run"
    arguments = ["--base_model_path", base_path, "--root_folder", root, "--importance", "l1", "--target_compression", 1.5,
                 "--criterion", "fraction", "--prune_fraction", 0.3, "--prune_iter", 5, *RUN_FLAGS]
    completed = run_in_process("prune_model.py", *arguments)
    assert "met at iteration 1" in completed.stdout
    summary = json.loads((root / "summary.json").read_text())
    assert summary["target"] == {"measure": "compression_rate", "value": 1.5, "met_at_iteration": 1}
    # a full 0.3 step would give 1.53x: the (only, last) iteration removed just enough for 1.5x
    last = summary["iterations"][-1]
    assert len(summary["iterations"]) == 1
    assert 1.5 <= last["compression_rate"] <= 1.5 * 1.02
    assert last["compression_rate"] == pytest.approx(summary["base"]["parameters"] / last["parameters"])
    record = json.loads((root / "iter1" / "apoz.json").read_text())
    assert record["importance"] == "l1" and record["ranking"] == "layer" and record["images"] == 0
    assert record["target"]["cut"] is True and record["target"]["predicted"] == pytest.approx(last["compression_rate"])
    network = keras.models.load_model(str(base_path), compile=False)
    l1 = channel_importance.importance_scores("l1", network, prune.any_model_groups(network, ignored_layers=STEM))
    for name, layer in record["layers"].items():
        assert "apoz" not in layer
        np.testing.assert_allclose(layer["score"], l1[name], rtol=1e-6)
        if layer["removed"]:  # the least important went
            assert max(l1[name][layer["removed"]]) <= min(l1[name][layer["kept"]])
    config = json.loads((root / "config.json").read_text())
    assert config["complete"] is True and config["results"]["target"]["met_at_iteration"] == 1
    # a run that met its target is complete, even with a larger --prune_iter (in process: no second TensorFlow start)
    before = {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}
    capfd.readouterr()
    prune_model.main([str(argument) for argument in arguments[:-len(RUN_FLAGS) - 2] + ["--prune_iter", 9] + RUN_FLAGS])
    assert "met its target at iteration 1 with these arguments: nothing to do" in capfd.readouterr().out
    after = {path: path.read_bytes() for path in root.rglob("*") if path.is_file() and path.name != files.LOCK_NAME}
    assert after == before  # (this process holds the folder's lock until it exits)


@pytest.mark.parametrize("case, flags, message", [
    ("both targets", ["--target_compression", 2, "--target_macs", 2, "--criterion", "fraction"], "not allowed with"),
    ("target 1", ["--target_compression", 1, "--criterion", "fraction"], "must be greater than 1"),
    ("target below 1", ["--target_macs", 0.5, "--criterion", "fraction"], "must be greater than 1"),
    ("target with std", ["--target_compression", 2], "needs --criterion fraction"),
    ("out of reach", ["--target_compression", 50, "--criterion", "fraction"], "out of reach"),
    ("unknown importance", ["--importance", "l2"], "invalid choice"),
    ("unknown ranking", ["--ranking", "network"], "invalid choice"),
])
def test_bad_flag_combinations_are_one_line_and_write_nothing(case, flags, message, base_path, tmp_path):
    root = tmp_path / "root"
    completed = run_in_process("prune_model.py", "--base_model_path", base_path, "--root_folder", root, *flags, *RUN_FLAGS, check=False)
    assert message in assert_one_line_error(completed)
    assert not root.exists()


def test_a_bad_target_from_the_command_line_is_one_line(base_path, tmp_path):
    completed = run_script("prune_model.py", "--base_model_path", base_path, "--root_folder", tmp_path / "root",
                           "--target_compression", "1.5", "--target_macs", "2", check=False)
    assert "--target_macs" in assert_one_line_error(completed)
    assert not (tmp_path / "root").exists()


# ---------------------------------------------------------------------------------------------
# The ablation's figure and table (benchmarks/pruning_ablation.py), on hand-written summaries


def write_summary(folder, importance, rates, accuracies, seconds=600.0, seed=0):
    folder.mkdir(parents=True)
    records = [{"iteration": index + 1, "parameters": int(1e6 / rate), "macs": int(5e7 / rate), "compression_rate": rate,
                "mac_ratio": rate * 0.8, "val_acc_pruned": acc - 0.2, "test_acc_pruned": acc - 0.2, "val_acc": acc,
                "test_acc": acc, "channels_removed": 10, "epochs": 4, "seconds": seconds}
               for index, (rate, acc) in enumerate(zip(rates, accuracies))]
    summary = {"base": {"parameters": 1000000, "macs": 50000000, "val_acc": 0.7, "test_acc": 0.68, "test_images": 10000},
               "iterations": records, "arguments": {"importance": importance, "seed": seed}, "target": None}
    (folder / "summary.json").write_text(json.dumps(summary))


def ablation_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pruning_ablation", f"{REPO}/benchmarks/pruning_ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    return ablation


def test_ablation_table_compares_criteria_at_the_same_compressions(tmp_path, capsys):
    ablation = ablation_module()
    root = tmp_path / "ablation"
    rates = [1.33, 1.72, 2.15, 2.64, 3.0]
    write_summary(root / "random", "random", rates, [0.6, 0.55, 0.5, 0.45, 0.4])
    write_summary(root / "taylor", "taylor", rates, [0.67, 0.66, 0.655, 0.65, 0.64], seconds=900.0)
    write_summary(root / "short", "l1", rates[:2], [0.66, 0.65])
    # a second seed of random, listed first by folder name: the cells give the mean, then seed 0's and seed 1's
    write_summary(root / "a_random_seed1", "random", rates, [0.6, 0.56, 0.52, 0.47, 0.42], seconds=300.0, seed=1)
    (root / "not_a_run").mkdir()
    ablation.main(["--ablation_root", str(root), "--figure", str(tmp_path / "ablation.png"), "--table", str(tmp_path / "table.md")])
    assert (tmp_path / "ablation.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| l1", "| taylor", "| random"]  # the criteria's order
    assert lines[3] == ("| taylor | 1 | 68.00% | 3 (2.15x) | 45.50% | 65.50% | 45 min | 5 (3.00x) | 44.00% | 64.00% | 75 min |")
    assert lines[4] == ("| random | 2 | 68.00% | 3 (2.15x) | 31.00% (30.00, 32.00) | 51.00% (50.00, 52.00) | 22 min | "
                        "5 (3.00x) | 21.00% (20.00, 22.00) | 41.00% (40.00, 42.00) | 38 min |")
    assert "not reached" in lines[2]
    with pytest.raises(cli.UserError, match="no pruning run"):
        ablation.main(["--ablation_root", str(root / "not_a_run")])


def test_ablation_verify_reloads_the_saved_models_with_plain_keras(tmp_path, cifar10_dir):
    from cnn_compression import data

    ablation = ablation_module()
    root = tmp_path / "ablation"
    write_summary(root / "random", "random", [1.5], [0.0])
    network = pixel_classifier()
    checkpoints.save_model(network, str(root / "random" / "iter1" / "model.h5"))
    _, _, x_test, y_test, _ = data.load_cifar10(cifar10_dir)
    predicted = network.predict(x_test.astype("float32"), batch_size=500, verbose=0).argmax(-1)
    accuracy = float(np.mean(predicted == y_test.reshape(-1)))
    summary_path = root / "random" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["iterations"][0]["test_acc"] = accuracy + 0.01  # a checkpoint that does not give its table row
    summary_path.write_text(json.dumps(summary))
    with pytest.raises(cli.UserError, match=r"1 of 1 saved models do not give their recorded test accuracy: random, iteration 1"):
        ablation.verify(str(root), cifar10_dir)
    summary["iterations"][0]["test_acc"] = accuracy
    summary_path.write_text(json.dumps(summary))
    [line] = ablation.verify(str(root), cifar10_dir)
    assert line.endswith(f"gives {100 * accuracy:.2f}% with plain Keras, recorded {100 * accuracy:.2f}%")
