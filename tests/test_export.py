"""export_model.py (cnn_compression.tflite) and evaluate_model.py --export_tflite: TFLite files that run, agree with Keras,
report honest accuracies, and refuse bad input cleanly."""

import json
import os
import time

import keras
import numpy as np
import pytest

from cnn_compression import data
import export_model
import model as resnet
from cnn_compression import checkpoints
from cnn_compression import cli
from cnn_compression import tflite
from conftest import assert_one_line_error, kill_when, run_in_process, run_script, temporaries


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    network = resnet.build_resnet50(resnet.width_spec(0.0625))
    # BatchNorm statistics away from (0, 1), so the converter's folding of them into the convolutions is checked.
    rng = np.random.default_rng(0)
    for layer in network.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            width = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, width), rng.normal(0, 0.2, width),
                               rng.normal(0, 0.2, width), rng.uniform(0.5, 2.0, width)])
    path = str(tmp_path_factory.mktemp("export") / "model.h5")
    checkpoints.save_model(network, path)
    return network, path


@pytest.fixture(scope="module")
def exported(tiny_model):
    """One real export, by default beside the model (in process: the script's new-process start is
    test_bad_model_is_one_line_and_writes_nothing's "missing" case)."""
    _, path = tiny_model
    completed = run_in_process("export_model.py", "--model_path", path, "--dataset", "sample", "--batch_size", "64")
    return os.path.dirname(path), completed


def read(path):
    with open(path, "rb") as handle:
        return handle.read()


def test_export_writes_both_models_and_a_report(exported, tiny_model):
    out_dir, completed = exported
    assert sorted(os.listdir(out_dir)) == ["export.json", "model.h5", "model_float32.tflite", "model_int8.tflite"]  # no temporaries
    assert "Traceback" not in completed.stderr and "TFLite int8" in completed.stdout
    report = json.load(open(os.path.join(out_dir, "export.json")))
    float_bytes, int8_bytes = read(os.path.join(out_dir, "model_float32.tflite")), read(os.path.join(out_dir, "model_int8.tflite"))
    assert report["float32"]["file_mb"] == len(float_bytes) / 1e6 and report["int8"]["file_mb"] == len(int8_bytes) / 1e6
    assert len(int8_bytes) < 0.6 * len(float_bytes)
    assert report["test_images"] == 500 and report["keras"]["path"] == tiny_model[1]
    # The percentile was chosen on held-out validation images: the best score, ties to the wider range.
    scores = report["int8"]["held_out_val_acc_by_percentile"]
    assert sorted(map(float, scores)) == sorted(tflite.CANDIDATE_PERCENTILES)
    chosen = report["int8"]["calibration_percentile"]
    assert scores[f"{chosen:g}"] == max(scores.values())
    assert all(score < max(scores.values()) for key, score in scores.items() if float(key) > chosen)
    assert report["int8"]["calibration_images"] + report["int8"]["held_out_val_images"] == data.SAMPLE_VALIDATION_SIZE


def test_float_model_matches_keras_and_reported_accuracies_are_the_interpreters(exported, tiny_model):
    out_dir, _ = exported
    network, _ = tiny_model
    split = data.load_split("sample")
    report = json.load(open(os.path.join(out_dir, "export.json")))
    float_bytes = read(os.path.join(out_dir, "model_float32.tflite"))
    images = split.x_test[:40].astype(np.float32)
    expected = network.predict(images, verbose=0)
    np.testing.assert_allclose(tflite.tflite_predict(float_bytes, images, 16), expected, rtol=0, atol=1e-5)
    for kind in ("float32", "int8"):
        outputs = tflite.tflite_predict(read(os.path.join(out_dir, f"model_{kind}.tflite")), split.x_test, 128)
        assert report[kind]["test_acc"] == np.mean(np.argmax(outputs, axis=1) == split.y_test), kind
    assert abs(report["float32"]["test_acc"] - report["keras"]["test_acc"]) <= 1 / 500


def test_int8_model_takes_and_returns_float_and_computes_in_int8(exported):
    out_dir, _ = exported
    interpreter = tflite.make_interpreter(read(os.path.join(out_dir, "model_int8.tflite")))
    assert interpreter.get_input_details()[0]["dtype"] == np.float32
    assert interpreter.get_output_details()[0]["dtype"] == np.float32
    dtypes = {}
    for op in interpreter._get_ops_details():
        for index in op["outputs"]:
            dtypes.setdefault(op["op_name"], set()).add(interpreter._get_tensor_details(index, 0)["dtype"])
    assert dtypes.pop("DEQUANTIZE") == {np.float32}  # the one float op: back to probabilities
    assert dtypes["CONV_2D"] == {np.int8} and all(kinds == {np.int8} for kinds in dtypes.values()), dtypes


def test_int8_ranges_are_a_percentile_of_per_image_extremes(exported):
    import tensorflow as tf

    out_dir, _ = exported
    float_bytes = read(os.path.join(out_dir, "model_float32.tflite"))
    images = data.load_split("sample").x_val[:60].astype(np.float32)
    calibrated = tflite.calibrate(float_bytes, images, 32)
    int8 = tflite.quantize(calibrated, tflite.activation_extremes(calibrated, images, 32), 90.0)
    # Reference: the stem's ReLU output in the float model, its per-image maxima and their 90th percentile.
    reference = tflite.tensorflow_interpreter(
        float_bytes, experimental_preserve_all_tensors=True,
        experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    reference.resize_tensor_input(reference.get_input_details()[0]["index"], images.shape)
    reference.allocate_tensors()
    reference.set_tensor(reference.get_input_details()[0]["index"], images)
    reference.invoke()
    [stem] = [t for t in reference.get_tensor_details() if "conv1_relu" in t["name"] and len(t["shape"]) == 4]
    expected_max = np.percentile(reference.get_tensor(stem["index"]).reshape(len(images), -1).max(axis=1), 90)
    quantized = tflite.tensorflow_interpreter(int8)
    [stem_int8] = [t for t in quantized.get_tensor_details() if t["name"] == stem["name"]]
    scale, zero_point = stem_int8["quantization"]
    assert zero_point == -128  # ReLU: the range starts at 0
    assert scale == pytest.approx(expected_max / 255, rel=1e-4)


def test_evaluate_model_flag_calls_the_same_export(exported, tiny_model, monkeypatch, capsys):
    import evaluate_model

    _, path = tiny_model
    calls = []

    def export_tflite(model_path, split, **options):
        calls.append((model_path, len(split.y_test), options))
        return json.load(open(os.path.join(exported[0], "export.json")))

    monkeypatch.setattr(tflite, "export_tflite", export_tflite)
    evaluate_model.main(["--model_path", path, "--base_model_path", path, "--dataset", "sample", "--latency_repeats", "0",
                         "--batch_size", "50", "--export_tflite"])
    printed = capsys.readouterr().out
    [(model_path, test_images, options)] = calls
    assert model_path == path and test_images == 500 and options["batch_size"] == 50
    assert f"test accuracy    {100 * options['keras_test_acc']:.2f}%" in printed  # evaluate's own number, passed on
    assert "TFLite int8" in printed


def test_evaluate_model_exports_a_model_that_is_not_our_resnet(tmp_path, capsys):
    """evaluate_model.py measures any functional classifier; --export_tflite exports it too."""
    import evaluate_model

    layers = keras.layers
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(8, 3, strides=2, name="conv")(layers.Rescaling(1 / 255.0)(inputs))
    x = layers.GlobalAveragePooling2D()(layers.ReLU()(layers.BatchNormalization()(x)))
    path = tmp_path / "classifier.h5"
    keras.Model(inputs, layers.Dense(10, activation="softmax")(x)).save(str(path))
    evaluate_model.main(["--model_path", str(path), "--base_model_path", str(path), "--dataset", "sample",
                         "--latency_repeats", "0", "--export_tflite"])
    report = json.load(open(tmp_path / "export.json"))
    assert report["keras"]["test_acc"] == report["float32"]["test_acc"]  # the float model computes what Keras does
    assert os.path.getsize(tmp_path / "model_int8.tflite") < os.path.getsize(tmp_path / "model_float32.tflite")
    assert "TFLite int8" in capsys.readouterr().out


def test_export_refuses_an_output_folder_that_is_a_file(tiny_model, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file\n")
    with pytest.raises(cli.UserError, match="not a folder"):
        export_model.main(["--model_path", tiny_model[1], "--dataset", "sample", "--out_dir", str(taken)])
    assert taken.read_text() == "a file\n"


@pytest.mark.parametrize("case", ["missing", "not_hdf5"])
def test_bad_model_is_one_line_and_writes_nothing(case, tmp_path):
    model_path = tmp_path / ("absent.h5" if case == "missing" else "model.h5")
    if case == "not_hdf5":
        model_path.write_text("not a model\n")
    before = sorted(os.listdir(tmp_path))
    # one case in a new process (TensorFlow's start says nothing on stderr), the other in this one
    run = run_script if case == "missing" else run_in_process
    completed = run("export_model.py", "--model_path", model_path, "--dataset", "sample", check=False)
    line = assert_one_line_error(completed)
    assert {"missing": "no model at", "not_hdf5": "not an HDF5"}[case] in line
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.slow  # make test-all
def test_export_killed_at_any_moment_keeps_whole_files_and_reruns_clean(exported, tiny_model):
    """SIGKILL re-exports late in their run (conversion, testing or the writes); every file stays
    whole (the last good export, or the new one), and a rerun leaves no temporaries."""
    out_dir, _ = exported
    arguments = ["export_model.py", "--model_path", tiny_model[1], "--dataset", "sample", "--batch_size", "64"]
    started = time.monotonic()
    run_script(*arguments)  # the kills aim at moments of such a run in a new process
    duration = time.monotonic() - started
    killed = []
    for fraction in (0.6, 0.85):  # of the first run's duration: late, yet before the end under varying load
        begun = time.monotonic()
        killed.append(kill_when(arguments, lambda: time.monotonic() - begun > fraction * duration or temporaries(out_dir),
                                may_finish=True))
        for kind in ("float32", "int8"):
            tflite.tflite_predict(read(os.path.join(out_dir, f"model_{kind}.tflite")), np.zeros((2, 32, 32, 3)), 2)
        json.load(open(os.path.join(out_dir, "export.json")))
    assert any(killed), "every re-export ended before its kill"
    run_script(*arguments)
    assert sorted(os.listdir(out_dir)) == ["export.json", "model.h5", "model_float32.tflite", "model_int8.tflite"]
