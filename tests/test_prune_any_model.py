"""prune_model.py on a functional classifier that is not our ResNet50: groups traced off the graph
each iteration, the surgery of prune.prune_groups, logits or probabilities, and its refusals."""

import json

import keras
import numpy as np
import pytest

from cnn_compression import channel_graph
from cnn_compression import channel_selection
from cnn_compression import cli
from cnn_compression import files
import evaluate_model
import prune
import prune_model
import pruning_iteration
from conftest import assert_one_line_error, run_in_process

RUN_FLAGS = ["--train_size", 200, "--epoch_num", 1, "--batch_size", 100, "--verbose", 0, "--precision", "float32"]


def small_classifier(softmax=False, classes=10):
    """A CNN for raw 0-255 CIFAR images that is not built by model.py: Rescaling inside, a residual
    block (Add), a Dropout, and a classifier giving logits (or probabilities)."""
    layers = keras.layers
    inputs = keras.Input((32, 32, 3), name="pixels")
    x = layers.Rescaling(1 / 255.0, name="scale")(inputs)
    x = layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="stem")(x)
    x = layers.ReLU(name="stem_relu")(layers.BatchNormalization(name="stem_bn")(x))
    y = layers.Conv2D(12, 3, padding="same", name="inner")(x)
    y = layers.ReLU(name="inner_relu")(layers.BatchNormalization(name="inner_bn")(y))
    y = layers.Conv2D(16, 3, padding="same", name="back")(y)
    y = layers.BatchNormalization(name="back_bn")(y)
    x = layers.ReLU(name="block_out")(layers.Add(name="add")([x, y]))
    x = layers.MaxPooling2D(name="pool")(x)
    x = layers.Conv2D(24, 3, padding="same", activation="relu", name="wide")(x)
    x = layers.Dropout(0.1, name="drop")(layers.GlobalAveragePooling2D(name="global")(x))
    outputs = layers.Dense(classes, activation="softmax" if softmax else None, name="classes")(x)
    return keras.Model(inputs, outputs, name="small_classifier")


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory):
    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("any_base") / "classifier.h5"
    small_classifier().save(str(path))
    return path


def test_prune_model_prunes_any_functional_classifier(classifier_path, tmp_path, capfd, data_flags):
    root = tmp_path / "run"
    arguments = ["--base_model_path", classifier_path, "--root_folder", root, "--prune_iter", 2, "--criterion", "fraction",
                 "--prune_fraction", 0.25, *data_flags, *RUN_FLAGS]
    run_in_process("prune_model.py", *arguments)
    summary = json.loads((root / "summary.json").read_text())
    base = keras.models.load_model(str(classifier_path), compile=False)
    # groups named after their ReLU ('inner_relu'; 'wide' has its own; the residual stream after its first)
    assert summary["base"]["group_widths"] == {"stem_relu": 16, "inner_relu": 12, "wide": 24}
    assert summary["base"]["parameters"] == base.count_params()
    assert [record["iteration"] for record in summary["iterations"]] == [1, 2]
    widths = {"stem_relu": 16, "inner_relu": 12, "wide": 24}
    for record in summary["iterations"]:
        folder = root / f"iter{record['iteration']}"
        layers = json.loads((folder / "apoz.json").read_text())["layers"]
        assert sorted(layers) == ["inner_relu", "wide"]  # stem is the residual stream's: --prune_residual
        for name in ("inner_relu", "wide"):
            assert layers[name]["width_before"] == widths[name]
            widths[name] -= int(np.floor(0.25 * widths[name] + 0.5))
            assert layers[name]["width_after"] == widths[name] == len(layers[name]["kept"])
        assert record["group_widths"] == widths
        network = keras.models.load_model(str(folder / "model.h5"), compile=False)  # plain Keras
        assert network.count_params() == record["parameters"]
        assert record["compression_rate"] == pytest.approx(base.count_params() / record["parameters"])
        assert network.get_layer("inner").filters == widths["inner_relu"] and network.get_layer("wide").filters == widths["wide"]
        assert network.get_layer("classes").units == 10
        assert 0 <= record["test_acc"] <= 1 and record["epochs"] == 1
    # the result is a model of the same layers (the Dropout, the Rescaling), not a ResNet50
    assert [layer.name for layer in network.layers] == [layer.name for layer in base.layers]
    # evaluate_model.py measures it as it measures our ResNet50s: the summary's numbers again
    evaluate_model.main([str(argument) for argument in [
        "--model_path", root / "iter2" / "model.h5", "--base_model_path", classifier_path, "--latency_repeats", 0,
        "--json", tmp_path / "evaluation.json", *data_flags, "--train_size", 200]])
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation["parameters"] == record["parameters"] and evaluation["macs"] == record["macs"]
    assert evaluation["compression_rate"] == pytest.approx(record["compression_rate"])
    assert evaluation["test_acc"] == pytest.approx(record["test_acc"]) and "width_spec" not in evaluation

    # --prune_residual and a target, in process (no second TensorFlow start): the residual stream goes too
    residual_root = tmp_path / "residual"
    capfd.readouterr()
    prune_model.main([str(argument) for argument in [
        "--base_model_path", classifier_path, "--root_folder", residual_root, "--prune_residual", "--importance", "taylor",
        "--criterion", "fraction", "--prune_fraction", 0.3, "--target_compression", 1.3, "--prune_iter", 3,
        *data_flags, *RUN_FLAGS]])
    summary = json.loads((residual_root / "summary.json").read_text())
    last = summary["iterations"][-1]
    assert summary["target"]["met_at_iteration"] == last["iteration"]
    assert 1.3 <= last["compression_rate"] <= 1.3 * 1.02
    layers = json.loads((residual_root / f"iter{last['iteration']}" / "apoz.json").read_text())["layers"]
    assert "stem_relu" in layers  # the residual stream, scored through its ReLUs before and after the Add
    pruned = keras.models.load_model(str(residual_root / f"iter{last['iteration']}" / "model.h5"), compile=False)
    assert pruned.get_layer("stem").filters == pruned.get_layer("back").filters < 16


def hard_swish_classifier():
    """A small CNN with MobileNetV3's hard swish, x * relu6(x + 3) / 6: ops on Python constants in
    the graph, which Keras cannot rebuild from .h5; only the native .keras holds this model."""
    layers = keras.layers
    inputs = keras.Input((32, 32, 3), name="pixels")
    x = layers.Rescaling(1 / 255.0, name="scale")(inputs)
    x = layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="stem")(x)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = x * layers.ReLU(6.0, name="gate")(x + 3.0) * (1 / 6)
    x = layers.Conv2D(12, 3, padding="same", name="inner")(x)
    x = layers.ReLU(name="inner_relu")(layers.BatchNormalization(name="inner_bn")(x))
    outputs = layers.Dense(10, name="classes")(layers.GlobalAveragePooling2D(name="global")(x))
    return keras.Model(inputs, outputs, name="hard_swish")


def test_a_model_only_keras_holds_is_pruned_from_keras_and_written_beside_each_h5(tmp_path, capsys, data_flags):
    keras.utils.set_random_seed(0)
    base_path = tmp_path / "base.keras"
    hard_swish_classifier().save(str(base_path))
    root = tmp_path / "run"
    arguments = ["--base_model_path", base_path, "--root_folder", root, "--criterion", "fraction", "--prune_fraction", 0.25,
                 *data_flags, *RUN_FLAGS]
    prune_model.main([str(argument) for argument in [*arguments, "--prune_iter", 1]])
    # said once, at the first .h5 (pruned.h5), not again for model.h5 nor for the pruned.h5 of a later model
    output = capsys.readouterr().out
    assert output.count("cannot hold") == 1 and "also writing pruned.keras, and from now on a .keras" in output
    folder = root / "iter1"
    # the resume aids (pruned.h5 and its pruned.keras) are gone once the iteration is recorded
    assert sorted(path.name for path in folder.iterdir()) == ["apoz.json", "history.json", "model.h5", "model.keras",
                                                            "pruned.json"]
    with pytest.raises(Exception):
        keras.models.load_model(str(folder / "model.h5"), compile=False)  # why model.keras is written
    network = keras.models.load_model(str(folder / "model.keras"), compile=False)  # plain Keras
    summary = json.loads((root / "summary.json").read_text())
    assert summary["base"]["parameters"] == keras.models.load_model(str(base_path)).count_params()
    assert network.count_params() == summary["iterations"][0]["parameters"] < summary["base"]["parameters"]
    # both groups a quarter narrower: the stem's (through the hard swish's ops) and inner's
    assert (network.get_layer("stem").filters, network.get_layer("inner").filters) == (12, 9)

    # a second iteration prunes iteration 1's model, which its model.h5 path opens through model.keras
    files.release_folder_locks()  # the first run's, as its process would have at exit
    prune_model.main([str(argument) for argument in [*arguments, "--prune_iter", 2]])
    assert "cannot hold" not in capsys.readouterr().out  # the same model, the same reason: said already
    network = keras.models.load_model(str(root / "iter2" / "model.keras"), compile=False)
    assert (network.get_layer("stem").filters, network.get_layer("inner").filters) == (9, 7)
    assert len(json.loads((root / "summary.json").read_text())["iterations"]) == 2


def test_the_stage_refuses_models_it_cannot_prune(tmp_path):
    keras.utils.set_random_seed(0)
    five_classes = tmp_path / "five.h5"
    small_classifier(classes=5).save(str(five_classes))
    with pytest.raises(cli.UserError, match=r"outputs \(None, 5\).*\(None, 10\) row of class scores"):
        prune_model.main(["--base_model_path", str(five_classes), "--root_folder", str(tmp_path / "a"), *map(str, RUN_FLAGS)])
    # a model with no channel group of two or more channels has nothing to prune
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(1, 3, name="conv")(inputs))
    frozen = keras.Model(inputs, keras.layers.Dense(10, name="classes")(x))
    assert not channel_graph.prunable_groups(channel_graph.trace_channel_groups(frozen))
    frozen_path = tmp_path / "frozen.h5"
    frozen.save(str(frozen_path))
    with pytest.raises(cli.UserError, match="no channel group this run may prune"):
        prune_model.main(["--base_model_path", str(frozen_path), "--root_folder", str(tmp_path / "b"), *map(str, RUN_FLAGS)])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing created


def test_apoz_without_relu_outputs_is_refused_in_one_line(tmp_path, data_flags):
    """A model whose groups have no ReLU-family output gets no APoZ score: one clear line, exit 2."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, activation="tanh", name="conv")(inputs)
    x = keras.layers.Conv2D(8, 3, activation="tanh", name="conv2")(x)
    network = keras.Model(inputs, keras.layers.Dense(10, name="classes")(keras.layers.GlobalAveragePooling2D()(x)))
    path = tmp_path / "tanh.h5"
    network.save(str(path))
    completed = run_in_process("prune_model.py", "--base_model_path", path, "--root_folder", tmp_path / "run",
                           *data_flags, *RUN_FLAGS, check=False)
    assert "--importance apoz scores no channel group" in assert_one_line_error(completed)
    assert not (tmp_path / "run").exists()
    assert prune.any_model_groups(network)  # groups exist: only the criterion cannot measure them


def test_any_model_fine_tunes_in_the_precision_policy_and_saves_float32(classifier_path, tmp_path, monkeypatch, data_flags):
    """--precision mixed_bfloat16 on a model that is not our ResNet50: the fine-tuned copy computes
    in bfloat16 (its output layer in float32, as our ResNet50's softmax), the saved model is float32."""
    from cnn_compression import training

    seen = {}
    fit_stage = training.fit_stage

    def recording_fit_stage(model, *arguments, **options):
        seen.update({layer.name: (layer.compute_dtype, layer.variable_dtype) for layer in model.layers})
        return fit_stage(model, *arguments, **options)

    monkeypatch.setattr(training, "fit_stage", recording_fit_stage)
    flags = RUN_FLAGS[:-2] + ["--precision", "mixed_bfloat16"]
    assert RUN_FLAGS[-2:] == ["--precision", "float32"]
    root = tmp_path / "run"
    try:
        prune_model.main([str(argument) for argument in [
            "--base_model_path", classifier_path, "--root_folder", root, "--prune_iter", 1, "--criterion", "fraction",
            "--prune_fraction", 0.25, *data_flags, *flags]])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert json.loads((root / "config.json").read_text())["arguments"]["precision"] == "mixed_bfloat16"
    assert seen["inner"] == seen["wide"] == seen["stem"] == ("bfloat16", "float32")
    assert seen["classes"] == ("float32", "float32")  # the output layer stays float32
    saved = keras.models.load_model(str(root / "iter1" / "model.h5"), compile=False)
    assert {layer.dtype_policy.name for layer in saved.layers} == {"float32"}


def split_residual_classifier(width=40):
    """A residual stream whose producer `x` (2 x width channels) is split in two groups by the two
    convolutions concatenated onto it: groups named by position, x[0:width] and x[width:2 width]."""
    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(2 * width, 1, name="x")(inputs)
    y = layers.Conv2D(4, 1, name="y")(x)  # p and q come after x: x names the groups
    halves = layers.Concatenate(name="halves")([layers.Conv2D(width, 1, name="p")(y),
                                                layers.Conv2D(width, 1, name="q")(y)])
    x = layers.ReLU(name="out")(layers.Add(name="add")([x, halves]))
    return keras.Model(inputs, layers.Dense(10, name="classes")(layers.GlobalAveragePooling2D()(x)))


def test_global_floors_of_split_groups_follow_them_after_pruning():
    """--ranking global keeps at least 10% of a group's BASE width; split groups are renamed by
    their positions after pruning, and must still find their base width."""
    import argparse

    keras.utils.set_random_seed(0)
    network = split_residual_classifier()
    args = argparse.Namespace(prune_residual=True, ranking="global", min_channels=1, round_to=1, ignored_layers=None)
    base_widths = pruning_iteration.base_group_widths(network, args)
    groups = pruning_iteration.channel_groups(network, args)
    assert [group["name"] for group in groups] == ["y", "x[0:40]", "x[40:80]"]  # residual streams last
    pruned = prune.prune_groups(network, groups, {"x[0:40]": np.arange(20), "x[40:80]": np.arange(15)})
    groups = pruning_iteration.channel_groups(pruned, args)
    assert [(group["name"], group["width"]) for group in groups] == [("y", 4), ("x[0:20]", 20), ("x[20:35]", 15)]
    # ceil(10% of 40), not of 20 or 15
    assert pruning_iteration.floors(base_widths, groups, args) == {"x[0:20]": 4, "x[20:35]": 4, "y": 1}


def test_a_target_out_of_reach_of_the_groups_the_criterion_scores_is_refused_up_front(tmp_path, data_flags):
    """apoz scores only groups with a ReLU-family output; a tanh group keeps its channels. A target
    that only pruning that group too could reach is refused before anything is written."""
    layers = keras.layers
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(16, 3, activation="relu", name="a")(inputs)
    x = layers.Conv2D(32, 3, activation="tanh", name="b")(x)
    network = keras.Model(inputs, layers.Dense(10, name="classes")(layers.GlobalAveragePooling2D()(x)))
    path = tmp_path / "tanh.h5"
    network.save(str(path))
    groups = prune.any_model_groups(network)
    assert [group["name"] for group in groups] == ["a", "b"] and not groups[1]["activations"]
    count = prune.size_counter(network, groups)
    base = network.count_params()
    # by hand: a at one channel, b whole: 3*3*3*1+1 + 3*3*1*32+32 + 32*10+10 = 678 parameters
    assert count({"a": 1})[0] == 678 and base == 5418
    assert base / count({"a": 1, "b": 1})[0] > 20 > base / 678  # 20x needs b, which apoz cannot score
    with pytest.raises(cli.UserError, match=r"--target_compression 20 is out of reach: .* gives 7\.99x \(1 group\(s\) --importance apoz cannot score"):
        prune_model.main([str(argument) for argument in [
            "--base_model_path", path, "--root_folder", tmp_path / "run", "--criterion", "fraction",
            "--target_compression", 20, "--prune_iter", 1, *data_flags, *RUN_FLAGS]])
    assert not (tmp_path / "run").exists()


def test_global_ranking_through_the_script_moves_channels_between_groups_down_to_the_base_floors(tmp_path, capsys, data_flags):
    """--ranking global in prune_model.py: 9 of `inner`'s 12 filters made tiny, so ranked across
    groups (each group's L1 divided by its mean) they go first and `wide` gives the rest; the
    kept channels are channel_selection.select_global's on the scores apoz.json records, the widths differ from
    the layer ranking's, and the second iteration stops at the floors, 10% of the BASE widths."""
    keras.utils.set_random_seed(0)
    network = small_classifier()
    kernel, bias = network.get_layer("inner").get_weights()
    kernel[..., :9] *= 0.01
    network.get_layer("inner").set_weights([kernel, bias])
    path = tmp_path / "base.h5"
    network.save(str(path))
    root = tmp_path / "run"
    prune_model.main([str(argument) for argument in [
        "--base_model_path", path, "--root_folder", root, "--ranking", "global", "--importance", "l1",
        "--criterion", "fraction", "--prune_fraction", 0.8, "--prune_iter", 2, *data_flags, *RUN_FLAGS]])
    summary = json.loads((root / "summary.json").read_text())
    floors = {"inner_relu": 2, "wide": 3}  # ceil(10% of 12 and of 24); 10% of the pruned widths would be 1 and 1
    widths = {"stem_relu": 16, "inner_relu": 12, "wide": 24}
    for record in summary["iterations"]:
        layers = json.loads((root / f"iter{record['iteration']}" / "apoz.json").read_text())["layers"]
        assert sorted(layers) == ["inner_relu", "wide"]
        scores = {name: np.asarray(layers[name]["score"]) for name in layers}
        assert {name: len(score) for name, score in scores.items()} == {"inner_relu": widths["inner_relu"], "wide": widths["wide"]}
        expected = channel_selection.select_global(scores, "fraction", fraction=0.8, floors=floors)
        for name in layers:
            assert layers[name]["kept"] == expected[name].tolist(), name
            widths[name] = len(expected[name])
        assert record["group_widths"] == widths
        assert all(widths[name] >= floors[name] for name in floors)
    first, second = summary["iterations"]
    # the layer ranking removes round(80%) of each group: inner 12 -> 2, wide 24 -> 5; global took the 9 tiny filters
    # of inner and 20 of wide (29 = round(80% of 36) in all)
    assert first["group_widths"] == {"stem_relu": 16, "inner_relu": 3, "wide": 4} != {"stem_relu": 16, "inner_relu": 2, "wide": 5}
    assert second["group_widths"] == {"stem_relu": 16, **floors}  # 80% of 7 would be 6 channels: only 2 could go
    pruned = keras.models.load_model(str(root / "iter2" / "model.h5"), compile=False)
    assert pruned.get_layer("inner").filters == 2 and pruned.get_layer("wide").filters == 3

    # --start_model_path: a new run pruning on from iteration 1 makes iteration 2's model again (the
    # same l1 scores, floors from the BASE widths, not from the start model's), compression counted
    # against the base; the start model is measured and listed
    on_root = tmp_path / "on"
    start = root / "iter1" / "model.h5"
    capsys.readouterr()
    prune_model.main([str(argument) for argument in [
        "--base_model_path", path, "--start_model_path", start, "--root_folder", on_root, "--ranking", "global",
        "--importance", "l1", "--criterion", "fraction", "--prune_fraction", 0.8, "--prune_iter", 1, *data_flags, *RUN_FLAGS]])
    on_summary = json.loads((on_root / "summary.json").read_text())
    [record] = on_summary["iterations"]
    kept = {name: layer["kept"] for name, layer in json.loads((on_root / "iter1" / "apoz.json").read_text())["layers"].items()}
    assert kept == {name: layer["kept"] for name, layer in json.loads((root / "iter2" / "apoz.json").read_text())["layers"].items()}
    assert record["group_widths"] == second["group_widths"] and record["parameters"] == second["parameters"]
    assert on_summary["base"]["parameters"] == network.count_params()
    assert record["compression_rate"] == pytest.approx(network.count_params() / record["parameters"])
    assert on_summary["start"]["parameters"] == first["parameters"] and on_summary["start"]["model_path"] == str(start)
    assert on_summary["start"]["test_acc"] == first["test_acc"] and on_summary["start"]["val_acc"] == first["val_acc"]
    assert on_summary["start"]["compression_rate"] == pytest.approx(first["compression_rate"])
    table = prune_model.format_table(on_summary).splitlines()
    assert table[2].split() == ["start", f"{first['parameters']:,}", f"{first['compression_rate']:.2f}x",
                                f"{first['macs'] / 1e6:.1f}M", f"{first['val_acc']:.4f}", f"{first['test_acc']:.4f}"]
    assert "\n".join(table) in capsys.readouterr().out
    # a start model that is not a pruned copy of the base is refused before anything is written
    other = tmp_path / "other.h5"
    keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
                      keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]).save(str(other))
    for base_path, start_path, reason in ((path, other, "their layers differ"),
                                          (start, path, "channel group.* are not the base's or wider")):
        with pytest.raises(cli.UserError, match=rf"--start_model_path .* was not pruned from --base_model_path .*: {reason}"):
            prune_model.main([str(argument) for argument in [
                "--base_model_path", base_path, "--start_model_path", start_path, "--root_folder", tmp_path / "refused",
                "--criterion", "fraction", "--prune_iter", 1, *data_flags, *RUN_FLAGS]])
        assert not (tmp_path / "refused").exists()
    with pytest.raises(cli.UserError, match=rf"--start_model_path .* is already at {first['compression_rate']:.2f}x of the base, past --target_compression 1.5$"):
        prune_model.main([str(argument) for argument in [
            "--base_model_path", path, "--start_model_path", start, "--root_folder", tmp_path / "refused",
            "--criterion", "fraction", "--target_compression", 1.5, "--prune_iter", 1, *data_flags, *RUN_FLAGS]])
    assert not (tmp_path / "refused").exists()


def test_any_model_pruning_killed_mid_fine_tuning_resumes_to_the_uninterrupted_files(classifier_path, tmp_path, data_flags):
    """SIGKILL of prune_model.py on a model that is not our ResNet50 once iteration 1's first
    fine-tuning epoch is backed up; the same command then resumes at epoch 2 (epoch 1 kept as the
    killed run wrote it) and writes what an uninterrupted run writes, to the bit: epoch 2 trains on
    the uninterrupted run's batches and crops (the pipeline is a function of the seed and epoch)."""
    import os

    from conftest import REPO, assert_files_whole, epoch_backed_up, kill_when, model_arrays

    flags = ["--base_model_path", classifier_path, "--prune_iter", 1, "--criterion", "fraction", "--prune_fraction", 0.25,
             *data_flags, *RUN_FLAGS[:3], 2, *RUN_FLAGS[4:]]  # two epochs
    assert RUN_FLAGS[2:4] == ["--epoch_num", 1]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_in_process("prune_model.py", "--root_folder", whole, *flags)
    kill_when([os.path.join(REPO, "prune_model.py"), "--root_folder", killed, *flags], epoch_backed_up(killed / "iter1"))
    assert_files_whole(killed)
    assert json.loads((killed / "summary.json").read_text())["iterations"] == []
    at_kill = json.loads((killed / "iter1" / "history.json").read_text())
    assert {key: len(values) for key, values in at_kill.items()} == {key: 1 for key in at_kill}
    rerun = run_in_process("prune_model.py", "--root_folder", killed, *flags[:-4], "--verbose", 2, *flags[-2:])
    assert "resuming the fine-tuning" in rerun.stdout and "Epoch 2/2" in rerun.stdout and "Epoch 1/2" not in rerun.stdout

    # before the fine-tuning: the same scores, the same channels, the same pruned model's accuracies
    assert json.loads((killed / "iter1" / "apoz.json").read_text()) == json.loads((whole / "iter1" / "apoz.json").read_text())
    pruned, whole_pruned = (json.loads((root / "iter1" / "pruned.json").read_text()) for root in (killed, whole))
    assert pruned.pop("seconds") > 0 and whole_pruned.pop("seconds") > 0 and pruned == whole_pruned
    history, whole_history = (json.loads((root / "iter1" / "history.json").read_text()) for root in (killed, whole))
    assert {key: values[:1] for key, values in history.items()} == at_kill  # epoch 1 not trained again
    assert history == whole_history  # the schedule continued where it stood, on the same batches
    summary, whole_summary = (json.loads((root / "summary.json").read_text()) for root in (killed, whole))
    assert summary["base"] == whole_summary["base"]
    [record], [whole_record] = summary["iterations"], whole_summary["iterations"]
    assert record.pop("seconds") > 0 and whole_record.pop("seconds") > 0 and record == whole_record
    assert json.loads((killed / "config.json").read_text())["complete"] is True
    assert sorted(os.listdir(killed / "iter1")) == sorted(os.listdir(whole / "iter1"))  # no backup left
    expected, resumed = (model_arrays(str(root / "iter1" / "model.h5")) for root in (whole, killed))
    assert expected.keys() == resumed.keys() and all(np.array_equal(expected[name], resumed[name]) for name in expected)
