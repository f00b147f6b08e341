"""APoZ pruning: scores against numpy, surgery invariants, selection rules, the iterative script."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from cnn_compression import channel_importance
from cnn_compression import channel_selection
from cnn_compression import checkpoints
import model as resnet
import prune
from cnn_compression import training
from conftest import (REPO, assert_files_whole, assert_one_line_error, epoch_backed_up, folder_bytes, kill_when, run_in_process,
                      temporaries)



@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).integers(0, 256, (40, 32, 32, 3)).astype(np.uint8)


STEM = ["conv1_conv"]  # prune_model.py's default --ignored_layers: the stem keeps its filters


def copy_of(network):
    """An independent copy (same weights) to make channels dead in."""
    copy = keras.models.clone_model(network)
    copy.set_weights(network.get_weights())
    return copy


def spec_width(spec, name):
    """The width spec entry of our ResNet50's group `name` ('conv3_block2_1_relu', 'conv4_residual')."""
    if name.endswith("_residual"):
        return spec["stages"][resnet.STAGE_NAMES.index(name.split("_")[0])]
    block, part, _ = name.rsplit("_", 2)
    return spec["blocks"][resnet.block_names().index(block)][int(part) - 1]


def logits(network, images):
    # eager: tracing a predict function costs more than running this tiny model on 40 images
    return keras.ops.convert_to_numpy(resnet.logits_model(network)(images.astype("float32"), training=False))


def post_relu(network, names, images):
    outputs = resnet.feature_model(network, names)(images.astype("float32"), training=False)
    return dict(zip(names, [keras.ops.convert_to_numpy(output) for output in outputs]))


def kill_channels(network, layer_names, channels):
    """BatchNorm gamma 0, beta -1: the channel's post-ReLU output is 0 for every input."""
    for name in layer_names:
        layer = network.get_layer(name)
        gamma, beta, mean, variance = layer.get_weights()
        gamma[channels], beta[channels] = 0.0, -1.0
        layer.set_weights([gamma, beta, mean, variance])


# ---------------------------------------------------------------------------------------------
# Scoring


def test_apoz_matches_numpy_reference(network, images):
    groups = prune.any_model_groups(network, residual=True, ignored_layers=STEM)
    names = [entry["layer"] for group in groups for entry in group["activations"]]
    # batch 16 over 40 images: the last, partial batch must be counted exactly too
    measured = channel_importance.apoz(network, names, images, batch_size=16, verbose=0)
    activations = resnet.feature_model(network, names).predict(images.astype("float32"), batch_size=16, verbose=0)
    for name, activation in zip(names, activations):
        reference = np.mean(activation == 0, axis=(0, 1, 2))
        np.testing.assert_allclose(measured[name], reference, rtol=0, atol=1e-12, err_msg=name)
    inner = np.concatenate([measured[name] for name in resnet.inner_activation_names()])
    assert 0.05 < inner.mean() < 0.95 and inner.std() > 0.05  # a real spread, not all 0 or all 1
    scores = {group["name"]: channel_importance.group_apoz(measured, group) for group in groups}
    stage_blocks = resnet.stage_block_names(2)
    np.testing.assert_allclose(scores["conv4_residual"], np.mean([measured[f"{b}_out"] for b in stage_blocks], axis=0))
    assert set(scores) == {group["name"] for group in groups} and len(scores) == 32 + 4


def test_apoz_accepts_a_labelled_dataset(network, images):
    dataset = tf.data.Dataset.from_tensor_slices((images, np.zeros(len(images), np.int64))).batch(32)
    names = ["conv2_block1_1_relu", "conv5_block3_out"]
    from_array = channel_importance.apoz(network, names, images, batch_size=8, verbose=0)
    from_dataset = channel_importance.apoz(network, names, dataset, verbose=0)
    for name in names:
        np.testing.assert_allclose(from_dataset[name], from_array[name], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Surgery


def test_removing_dead_inner_channels_leaves_logits_unchanged(network, images, tmp_path):
    dead_network = copy_of(network)
    groups = prune.any_model_groups(dead_network, ignored_layers=STEM)
    assert [group["name"] for group in groups] == resnet.inner_activation_names()  # conv1, conv2 of every block
    rng = np.random.default_rng(2)
    keep, dead = {}, {}
    for group in groups:
        width = group["width"]
        dead[group["name"]] = np.sort(rng.choice(width, int(rng.integers(1, width)), replace=False))
        [norm] = [entry["layer"] for entry in group["carriers"]]  # the conv's BatchNorm
        kill_channels(dead_network, [norm], dead[group["name"]])
        keep[group["name"]] = rng.permutation(prune.removed_channels(width, dead[group["name"]]))  # unsorted on purpose
    outputs = post_relu(dead_network, list(dead), images)
    assert all(np.all(outputs[name][..., channels] == 0) for name, channels in dead.items())
    before = logits(dead_network, images)
    pruned = prune.prune_groups(dead_network, groups, keep)
    assert np.abs(logits(pruned, images) - before).max() < 1e-4
    new_spec = resnet.describe_model(pruned)[0]  # still our ResNet50, narrower
    assert new_spec["blocks"] == [[len(keep[f"{b}_1_relu"]), len(keep[f"{b}_2_relu"])] for b in resnet.block_names()]
    assert pruned.count_params() == resnet.parameter_count(new_spec, "cifar") < network.count_params()
    kept = np.sort(keep["conv3_block2_2_relu"])  # the kept filters are the chosen ones, in index order
    np.testing.assert_array_equal(pruned.get_layer("conv3_block2_2_conv").kernel.numpy(), dead_network.get_layer(
        "conv3_block2_2_conv").kernel.numpy()[:, :, np.sort(keep["conv3_block2_1_relu"])][..., kept])
    # the result is an ordinary Keras model: plain load_model, no custom objects, same outputs
    checkpoints.save_model(pruned, str(tmp_path / "pruned.h5"))
    reopened = keras.models.load_model(str(tmp_path / "pruned.h5"), compile=False)
    np.testing.assert_allclose(logits(reopened, images), before, atol=1e-4)


def test_removing_dead_residual_channels_leaves_logits_unchanged(network, images):
    dead_network = copy_of(network)
    groups = [group for group in prune.any_model_groups(dead_network, residual=True, ignored_layers=STEM)
              if prune.is_residual(group)]
    assert [group["name"] for group in groups] == [f"{stage}_residual" for stage in resnet.STAGE_NAMES]
    keep = {}
    for group in groups:
        width = group["width"]
        dead = np.arange(1, width, 3)  # a third of the stream, first and last stages included
        norms = [entry["layer"] for entry in group["carriers"]]  # every conv3 BN and the shortcut BN
        assert len(norms) == len(group["producers"]) == 1 + len(resnet.stage_block_names(resnet.STAGE_NAMES.index(
            group["name"].split("_")[0])))
        kill_channels(dead_network, norms, dead)
        keep[group["name"]] = prune.removed_channels(width, dead)
    outputs = post_relu(dead_network, [f"{b}_out" for b in resnet.block_names()], images)
    for index, block in enumerate(resnet.block_names()):
        stage = resnet.STAGE_NAMES[resnet.stage_of_block(index)]
        output = outputs[f"{block}_out"]
        removed = prune.removed_channels(output.shape[-1], keep[f"{stage}_residual"])
        assert np.all(output[..., removed] == 0) and np.any(output > 0), block
    before = logits(dead_network, images)
    pruned = prune.prune_groups(dead_network, groups, keep)
    assert np.abs(logits(pruned, images) - before).max() < 1e-4
    new_spec = resnet.describe_model(pruned)[0]
    assert new_spec["stages"] == [len(keep[f"{stage}_residual"]) for stage in resnet.STAGE_NAMES]
    assert pruned.get_layer("predictions").kernel.shape == (new_spec["stages"][-1], 10)
    assert pruned.count_params() == resnet.parameter_count(new_spec, "cifar")


def test_surgery_rejects_bad_indices(network):
    groups = prune.any_model_groups(network, ignored_layers=STEM)
    with pytest.raises(prune.EmptyLayerError):
        prune.prune_groups(network, groups, {"conv2_block1_1_relu": []})
    with pytest.raises(ValueError, match="within"):
        prune.prune_groups(network, groups, {"conv2_block1_1_relu": [0, 4]})
    with pytest.raises(ValueError, match="distinct"):
        prune.prune_groups(network, groups, {"conv2_block1_1_relu": [1, 1]})
    with pytest.raises(ValueError, match="no channel group"):
        prune.prune_groups(network, groups, {"conv2_block1_3_relu": [0]})


def test_ignored_layers_keep_the_stem_by_default_and_any_named_layer_whole(network):
    import argparse

    import pruning_iteration

    def names(ignored, residual=False, model=network):
        args = argparse.Namespace(prune_residual=residual, ignored_layers=ignored)
        return [group["name"] for group in pruning_iteration.channel_groups(model, args)]

    assert names(None) == resnet.inner_activation_names()  # the default: conv1_conv, the stem
    assert names("") == ["conv1_relu"] + resnet.inner_activation_names()
    # a layer that makes (a conv) or carries (a BatchNorm) a group's channels keeps them; named layers
    # replace the default, so the stem is pruned again
    assert names("conv2_block1_1_conv, conv3_block1_2_bn") == ["conv1_relu"] + [
        name for name in resnet.inner_activation_names() if name not in ("conv2_block1_1_relu", "conv3_block1_2_relu")]
    assert "conv4_residual" not in names("conv1_conv,conv4_block3_3_conv", residual=True)
    inputs = keras.Input((8, 8, 3))
    other = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)))
    assert names(None, model=other) == ["conv"]  # the default names a layer this model lacks: nothing ignored


# ---------------------------------------------------------------------------------------------
# Selection


def test_std_rule_removes_channels_above_mean_plus_k_std():
    apoz = np.array([0.1, 0.2, 0.15, 0.9, 0.12, 0.95, 0.1, 0.11])
    scores = 1 - apoz  # selection takes importances: higher = keep
    threshold = apoz.mean() + apoz.std()
    np.testing.assert_array_equal(channel_selection.select_channels(scores), np.flatnonzero(apoz <= threshold))
    np.testing.assert_array_equal(channel_selection.select_channels(scores), [0, 1, 2, 4, 6, 7])
    assert len(channel_selection.select_channels(scores, std_k=3.0)) == 8
    np.testing.assert_array_equal(channel_selection.select_channels(np.full(5, 0.6)), np.arange(5))  # equal scores: nothing below


def test_fraction_rule_min_channels_and_round_to():
    scores = 1 - np.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0])  # importances of these APoZ
    np.testing.assert_array_equal(channel_selection.select_channels(scores, "fraction", fraction=0.3), [0, 1, 3, 5, 7, 8, 9])
    np.testing.assert_array_equal(channel_selection.select_channels(scores, "fraction", fraction=0.9, min_channels=3), [1, 5, 9])
    assert len(channel_selection.select_channels(scores, "fraction", fraction=0.5, round_to=4)) == 8  # 5 kept -> 8
    assert len(channel_selection.select_channels(scores, "fraction", fraction=0.1, round_to=4)) == 10  # 9 -> 12, capped at the width
    np.testing.assert_array_equal(channel_selection.select_channels([0.3, 0.3, 0.3], "fraction", fraction=0.5), [0])  # ties: lower index kept
    assert len(channel_selection.select_channels([0.9], "fraction", fraction=0.9)) == 1  # the default floor keeps one channel
    with pytest.raises(channel_selection.EmptyLayerError, match="remove all 4 channels"):
        channel_selection.select_channels(scores[:4], "fraction", fraction=0.9, min_channels=0)


# ---------------------------------------------------------------------------------------------
# prune_model.py


@pytest.fixture(scope="module")
def foreign_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("foreign")
    inputs = keras.Input((32, 32, 3))
    keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs))).save(str(folder / "other.h5"))
    (folder / "text.h5").write_text("not a model\n")
    return folder


@pytest.mark.parametrize("case", ["no base model", "prune_iter 0", "fraction 1.5", "fraction 0",
                                  "nothing to prune", "not HDF5", "would empty a layer", "unknown ignored layer"])
def test_bad_input_is_one_line_and_writes_nothing(case, base_path, foreign_files, tmp_path):
    root = tmp_path / "root"
    flags = {
        "no base model": ["--base_model_path", tmp_path / "missing.h5"],
        "prune_iter 0": ["--base_model_path", base_path, "--prune_iter", "0"],
        "fraction 1.5": ["--base_model_path", base_path, "--criterion", "fraction", "--prune_fraction", "1.5"],
        "fraction 0": ["--base_model_path", base_path, "--prune_fraction", "0"],
        "nothing to prune": ["--base_model_path", foreign_files / "other.h5"],
        "not HDF5": ["--base_model_path", foreign_files / "text.h5"],
        "would empty a layer": ["--base_model_path", base_path, "--criterion", "fraction", "--prune_fraction", "0.9",
                                "--min_channels", "0"],
        "unknown ignored layer": ["--base_model_path", base_path, "--ignored_layers", "conv1_conv,conv9_conv"],
    }[case]
    line = assert_one_line_error(run_in_process("prune_model.py", "--root_folder", root, *flags, check=False))
    assert {"no base model": "no base model", "prune_iter 0": "--prune_iter", "fraction 1.5": "--prune_fraction",
            "fraction 0": "--prune_fraction", "nothing to prune": "has no channel group this run may prune", "not HDF5": "not an HDF5",
            "would empty a layer": "remove all 4 channels of conv2_block1_1_relu",
            "unknown ignored layer": "--ignored_layers names conv9_conv, which"}[case] in line
    assert not root.exists()


def test_a_backup_half_written_by_a_kill_is_restored_or_dropped(tmp_path):
    """Resuming an interrupted fine-tuning must survive a kill during Keras' backup write
    (found by the SIGKILL test below: Keras alone then fails on every rerun)."""
    import h5py

    backup = tmp_path / "backup"
    backup.mkdir()
    with h5py.File(backup / "latest.weights.h5", "w") as archive:
        archive["weights"] = np.arange(20000, dtype="float32")
    whole = (backup / "latest.weights.h5").read_bytes()
    (backup / "training_metadata.json").write_text('{"epoch": 2, "batch": 0}')
    assert training.repair_backup(str(tmp_path)) == "ok"
    # killed while writing epoch 3's weights: epoch 2's pair survives as .bkp
    (backup / "latest.weights.h5.bkp").write_bytes(whole)
    (backup / "training_metadata.json.bkp").write_text('{"epoch": 2, "batch": 0}')
    (backup / "latest.weights.h5").write_bytes(whole[: len(whole) // 2])
    assert training.repair_backup(str(tmp_path)) == "restored"
    assert (backup / "latest.weights.h5").read_bytes() == whole
    # killed while writing the first epoch's weights: nothing to fall back on, start afresh
    (backup / "latest.weights.h5.bkp").unlink()
    (backup / "latest.weights.h5").write_bytes(whole[: len(whole) // 2])
    assert training.repair_backup(str(tmp_path)) == "discarded" and not backup.exists()
    assert training.repair_backup(str(tmp_path)) == "none"


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, data_flags):
    """Two iterations on a small residual CNN, SIGKILLed three times: mid-pruning of iteration 1,
    after the first fine-tuning epoch of iteration 2, and after iteration 2's fine-tuning but
    before its record; then rerun with the same command. (Pruning is one path for every model: a
    small one keeps the four processes' tracing short; resnet_run below is our ResNet50's run.)"""
    from test_prune_any_model import small_classifier

    folder = tmp_path_factory.mktemp("pruning")
    keras.utils.set_random_seed(0)
    base = folder / "classifier.h5"
    small_classifier().save(str(base))
    root = folder / "run"
    arguments = ["--base_model_path", base, "--root_folder", root, "--prune_iter", 2, "--prune_residual",
                 "--criterion", "fraction", "--prune_fraction", 0.25,
                 "--epoch_num", 2, "--train_size", 256, "--apoz_samples", 200, "--batch_size", 256, "--verbose", 2,
                 # float32 whatever the host: under auto's mixed_bfloat16 (a CPU with AMX) the fit validates in
                 # bfloat16 and the saved float32 model.h5 then measures another val_acc than the history's
                 "--precision", "float32", *data_flags]
    script = [os.path.join(REPO, "prune_model.py"), *arguments]
    # 1. APoZ written, surgery not yet marked usable (pruned.json is the last write): redone on rerun.
    kill_when(script, lambda: (root / "iter1" / "apoz.json").exists())
    assert not (root / "summary.json").exists() or not json.loads((root / "summary.json").read_text())["iterations"]
    assert_files_whole(root)

    # 2. Once iteration 2's first fine-tuning epoch is fully backed up (the metadata is the backup's
    # last write), so the rerun must resume at epoch 2.
    kill_when(script, epoch_backed_up(root / "iter2"), timeout=600)
    assert_files_whole(root)
    at_kill = {
        "summary": json.loads((root / "summary.json").read_text()),
        "pruned": json.loads((root / "iter2" / "pruned.json").read_text()),
        "apoz": (root / "iter2" / "apoz.json").read_bytes(),
        "iter1": {name: (root / "iter1" / name).read_bytes() for name in ("model.h5", "history.json", "apoz.json")},
    }
    # 3. Fine-tuning finished, the iteration not yet recorded in summary.json.
    with open(root.parent / "resumed.log", "w") as log:
        kill_when(script, lambda: (root / "iter2" / "backup" / training.FIT_FINISHED).exists(), stdout=log)
    assert_files_whole(root)
    at_kill["resumed"] = (root.parent / "resumed.log").read_text()
    at_kill["iter2"] = {name: (root / "iter2" / name).read_bytes() for name in ("model.h5", "history.json")}
    rerun = run_in_process("prune_model.py", *arguments)
    return root, arguments, at_kill, rerun


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory, base_path, data_flags):
    """Our ResNet50 pruned twice by APoZ's std rule with --prune_residual, uninterrupted."""
    root = tmp_path_factory.mktemp("resnet_pruning") / "run"
    run_in_process("prune_model.py", "--base_model_path", base_path, "--root_folder", root, "--prune_iter", 2,
                   "--prune_residual", "--epoch_num", 1, "--train_size", 256, "--apoz_samples", 200, "--batch_size", 256,
                   "--verbose", 0, "--precision", "float32", *data_flags)
    return root


def test_interrupted_run_resumes_and_completes(interrupted_run):
    root, _, at_kill, rerun = interrupted_run
    assert [record["iteration"] for record in at_kill["summary"]["iterations"]] == [1]
    # iteration 1 was complete and is reused as is; iteration 2 resumed its fine-tuning at epoch 2
    assert all((root / "iter1" / name).read_bytes() == content for name, content in at_kill["iter1"].items())
    assert (root / "iter2" / "apoz.json").read_bytes() == at_kill["apoz"]
    assert "resuming the fine-tuning" in at_kill["resumed"]
    assert "Epoch 2/2" in at_kill["resumed"] and "Epoch 1/2" not in at_kill["resumed"]
    # the last rerun found the fine-tuning finished: no epoch again, the files as they were
    assert "Epoch" not in rerun.stdout
    assert all((root / "iter2" / name).read_bytes() == content for name, content in at_kill["iter2"].items())
    summary = json.loads((root / "summary.json").read_text())
    assert summary["iterations"][1]["val_acc_pruned"] == at_kill["pruned"]["val_acc_pruned"]
    assert summary["base"] == at_kill["summary"]["base"]
    assert json.loads((root / "config.json").read_text())["complete"] is True
    assert not temporaries(root)


def test_finished_run_files_are_complete_and_consistent(resnet_run):
    root = resnet_run
    summary = json.loads((root / "summary.json").read_text())
    base = summary["base"]
    assert set(base) == {"model_path", "parameters", "macs", "val_acc", "test_acc", "test_images", "group_widths", "width_spec"}
    assert [record["iteration"] for record in summary["iterations"]] == [1, 2]
    assert summary["arguments"]["prune_residual"] is True
    previous_spec, previous_parameters = base["width_spec"], base["parameters"]
    names = {name for name in base["group_widths"] if name != "conv1_relu"}  # every group but the stem's
    assert len(names) == 36 and all(base["group_widths"][name] == spec_width(previous_spec, name) for name in names)
    for record in summary["iterations"]:
        folder = root / f"iter{record['iteration']}"
        assert sorted(os.listdir(folder)) == ["apoz.json", "history.json", "model.h5", "pruned.json"]
        network = keras.models.load_model(str(folder / "model.h5"), compile=False)  # plain Keras
        spec = resnet.describe_model(network)[0]
        assert spec == record["width_spec"]
        assert record["parameters"] == network.count_params() == resnet.parameter_count(spec) < previous_parameters
        assert record["macs"] == resnet.count_macs(network)[1]
        assert record["group_widths"] == {name: spec_width(spec, name) for name in names} | {"conv1_relu": spec["stem"]}
        assert record["compression_rate"] == pytest.approx(base["parameters"] / record["parameters"])
        assert record["mac_ratio"] == pytest.approx(base["macs"] / record["macs"])
        history = json.loads((folder / "history.json").read_text())
        assert tuple(history) == training.HISTORY_KEYS and record["epochs"] == len(history["val_acc"]) == 1
        assert record["val_acc"] == pytest.approx(max(history["val_acc"]), abs=2e-4)  # the best-val checkpoint
        for key in ("val_acc_pruned", "test_acc_pruned", "val_acc", "test_acc"):
            assert 0 <= record[key] <= 1
        apoz = json.loads((folder / "apoz.json").read_text())
        assert apoz["iteration"] == record["iteration"] and apoz["criterion"] == "std" and apoz["importance"] == "apoz"
        assert set(apoz["layers"]) == names
        removed = 0
        for name, layer in apoz["layers"].items():
            assert sorted(layer["kept"] + layer["removed"]) == list(range(layer["width_before"]))
            assert layer["width_before"] == len(layer["apoz"]) == spec_width(previous_spec, name)
            np.testing.assert_allclose(layer["score"], 1 - np.asarray(layer["apoz"]), atol=1e-12)
            assert layer["width_after"] == len(layer["kept"]) == spec_width(spec, name) >= 1
            removed += len(layer["removed"])
        assert record["channels_removed"] == removed > 0
        previous_spec, previous_parameters = spec, record["parameters"]


def test_rerun_of_a_finished_run_changes_nothing(interrupted_run):
    root, arguments, _, _ = interrupted_run
    before = folder_bytes(root)
    again = run_in_process("prune_model.py", *arguments)
    assert "nothing to do" in again.stdout
    assert "--overwrite" in assert_one_line_error(run_in_process("prune_model.py", *arguments, "--std_k", 2, check=False))
    # a bad base model with --overwrite must not destroy the finished run either
    assert "no base model" in assert_one_line_error(
        run_in_process("prune_model.py", *arguments, "--overwrite", "--base_model_path", root / "missing.h5", check=False))
    assert folder_bytes(root) == before
