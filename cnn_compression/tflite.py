"""TensorFlow Lite: float32 and int8 (post-training quantization) conversion of any Keras
classifier, robust int8 calibration, the interpreter, and TFLite accuracy and latency.

The int8 model quantizes every weight (per channel) and activation (per tensor); its input and
output stay float32 (raw 0-255 pixels in, class probabilities out, exactly like the Keras model),
so callers need no quantization parameters. Activation ranges are calibrated on validation
images, robustly: TFLite's calibration takes each tensor's plain min/max, but about 1% of images
drive our base model's activations 10-100x above the rest, and those ranges left the other 99% so
few int8 levels that accuracy fell 19 points. Here each range covers the per-image extremes of a
percentile of the calibration images, the percentile chosen on held-out validation images.
"""

import os
import tempfile
import time
import warnings

from cnn_compression import checkpoints
from cnn_compression import files
from cnn_compression import results
from cnn_compression import stages
from cnn_compression.cli import silenced_stderr
from cnn_compression.errors import UserError

FLOAT_NAME = "model_float32.tflite"
INT8_NAME = "model_int8.tflite"
REPORT_NAME = "export.json"
DEFAULT_CALIBRATION_IMAGES = 500
# 100: each range spans everything the calibration images produced (plain min/max); lower values
# clip the rarest images' extremes.
CANDIDATE_PERCENTILES = (100.0, 99.0, 98.0, 95.0, 90.0, 80.0)


# ---------------------------------------------------------------------------------------------
# Conversion


def write_inference_saved_model(network, folder):
    """A SavedModel whose one signature runs `network` in inference mode on any batch size.

    Keras 3's default export traces the training-mode call; TFLite needs inference mode (BatchNorm
    on its moving statistics, which the converter then folds into the convolutions).
    """
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(network)
    signature = [tf.TensorSpec((None, *network.input_shape[1:]), tf.float32, name="images")]
    archive.add_endpoint("serve", lambda images: network(images, training=False), input_signature=signature)
    archive.write_out(folder, verbose=False)


def convert_float(saved_model_folder):
    import tensorflow as tf

    with silenced_stderr():
        return tf.lite.TFLiteConverter.from_saved_model(saved_model_folder).convert()


def float_tflite(network):
    """`network` as a float32 TFLite flatbuffer (BatchNorm folded into the convolutions by the converter)."""
    with tempfile.TemporaryDirectory(prefix="export-") as saved_model_folder:
        write_inference_saved_model(network, saved_model_folder)
        return convert_float(saved_model_folder)


def calibrate(float_model, images, batch_size):
    """`float_model` (a flatbuffer) with TFLite's calibration ranges recorded on `images` (raw 0-255 pixels).

    TFLite's own calibrator, as its converter runs it (tf.lite.experimental.QuantizationDebugger
    builds on the same steps); it marks the tensors int8 needs ranges for, which `quantize` then sets.
    """
    import numpy as np
    from tensorflow.lite.python.optimize import calibrator

    def representative_dataset():
        for start in range(0, len(images), batch_size):
            yield [np.asarray(images[start:start + batch_size], np.float32)]

    with silenced_stderr():
        return calibrator.Calibrator(calibrator.add_intermediate_tensors(float_model)).calibrate(representative_dataset)


def _ranged_tensors(flatbuffer):
    """Indices of the tensors that carry a calibration range, and the parsed model."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
    tensors = model.subgraphs[0].tensors
    indices = [index for index, tensor in enumerate(tensors)
               if tensor.quantization is not None and tensor.quantization.min is not None and len(tensor.quantization.min)]
    return indices, model


def activation_extremes(calibrated, images, batch_size):
    """{tensor index: (per-image minima, per-image maxima)} of every ranged activation on `images`.

    Read off the calibrated float model with every tensor kept (no buffer sharing, no delegate),
    so the values are the ones each op really produced.
    """
    import numpy as np
    import tensorflow as tf

    indices, _ = _ranged_tensors(calibrated)
    interpreter = tensorflow_interpreter(
        calibrated, experimental_preserve_all_tensors=True,
        experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    input_index = interpreter.get_input_details()[0]["index"]
    minima, maxima = {index: [] for index in indices}, {index: [] for index in indices}
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start:start + batch_size], np.float32)
        interpreter.resize_tensor_input(input_index, batch.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(input_index, batch)
        interpreter.invoke()
        for index in indices:
            values = interpreter.get_tensor(index)
            if values.ndim and values.shape[0] == len(batch):  # activations; anything else keeps TFLite's range
                values = values.reshape(len(batch), -1)
                minima[index].append(values.min(axis=1))
                maxima[index].append(values.max(axis=1))
    return {index: (np.concatenate(minima[index]), np.concatenate(maxima[index])) for index in indices if minima[index]}


def quantize(calibrated, extremes, percentile):
    """The int8 model (float32 input and output) whose activation ranges cover the per-image
    extremes of `percentile` % of the calibration images."""
    import numpy as np
    import tensorflow as tf
    from tensorflow.lite.python.convert import mlir_quantize
    from tensorflow.lite.tools import flatbuffer_utils

    _, model = _ranged_tensors(calibrated)
    tensors = model.subgraphs[0].tensors
    for index, (minima, maxima) in extremes.items():
        # A range must hold 0 exactly (zero padding, ReLU).
        tensors[index].quantization.min = np.array([min(np.percentile(minima, 100 - percentile), 0.0)], np.float32)
        tensors[index].quantization.max = np.array([max(np.percentile(maxima, percentile), 0.0)], np.float32)
    with silenced_stderr():
        return mlir_quantize(flatbuffer_utils.convert_object_to_bytearray(model),
                             input_data_type=tf.float32, output_data_type=tf.float32)


# ---------------------------------------------------------------------------------------------
# Running


def _threads():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def tensorflow_interpreter(content, **options):
    """TensorFlow's own TFLite interpreter on all usable cores."""
    import tensorflow as tf

    with warnings.catch_warnings():
        # TensorFlow 2.21's interpreter works; the warning only points to LiteRT.
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        return tf.lite.Interpreter(model_content=content, num_threads=_threads(), **options)


def make_interpreter(content):
    """A TFLite interpreter on all usable cores: LiteRT's when `ai-edge-litert` is installed, else TensorFlow's."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return tensorflow_interpreter(content)
    return Interpreter(model_content=content, num_threads=_threads())


def tflite_predict(content, images, batch_size):
    """The outputs of a float-I/O TFLite model on `images`, in batches of `batch_size`."""
    import numpy as np

    interpreter = make_interpreter(content)
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    outputs, shape = [], None
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start:start + batch_size], np.float32)
        if batch.shape != shape:  # the first batch and a shorter last one
            interpreter.resize_tensor_input(input_index, batch.shape)
            with silenced_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
                interpreter.allocate_tensors()
            shape = batch.shape
        interpreter.set_tensor(input_index, batch)
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(output_index).copy())
    return np.concatenate(outputs)


def tflite_latency(content, batch_size, repeats, warmup=2):
    """Median seconds of one interpreter invoke on `batch_size` images (all usable cores, XNNPACK)."""
    import statistics

    import numpy as np

    interpreter = make_interpreter(content)
    details = interpreter.get_input_details()[0]
    input_index, input_shape = details["index"], tuple(int(size) for size in details["shape"][1:])
    interpreter.resize_tensor_input(input_index, (batch_size, *input_shape))
    with silenced_stderr():
        interpreter.allocate_tensors()
    images = np.random.default_rng(0).integers(0, 256, (batch_size, *input_shape)).astype(np.float32)
    interpreter.set_tensor(input_index, images)
    for _ in range(warmup):
        interpreter.invoke()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        interpreter.invoke()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def tflite_accuracy(content, images, labels, batch_size):
    import numpy as np

    if len(labels) == 0:
        return None
    return float(np.mean(np.argmax(tflite_predict(content, images, batch_size), axis=1) == labels))


# ---------------------------------------------------------------------------------------------
# Export


def convert_int8(float_model, split, calibration_images, fixed_percentile, seed, batch_size):
    """The int8 model and how it was calibrated.

    Calibration takes up to `calibration_images` class-stratified validation images, at most half
    the split; unless `fixed_percentile` is given, the other validation images choose the
    percentile among CANDIDATE_PERCENTILES (ties go to the wider range).
    """
    import numpy as np

    from cnn_compression import data

    count = min(calibration_images, len(split.y_val) // 2)
    if count < 1:
        raise UserError(f"int8 calibration needs at least 2 validation images; the split has {len(split.y_val)}")
    calibration = data.stratified_indices(split.y_val, count, seed)
    calibrated = calibrate(float_model, split.x_val[calibration], batch_size)
    extremes = activation_extremes(calibrated, split.x_val[calibration], batch_size)
    details = {"calibration_images": count, "input_output": "float32"}
    if fixed_percentile is not None:
        return quantize(calibrated, extremes, fixed_percentile), {**details, "calibration_percentile": fixed_percentile}
    held_out = np.setdiff1d(np.arange(len(split.y_val)), calibration)
    best, best_model, scores = None, None, {}
    for candidate in CANDIDATE_PERCENTILES:
        content = quantize(calibrated, extremes, candidate)
        scores[candidate] = tflite_accuracy(content, split.x_val[held_out], split.y_val[held_out], batch_size)
        if best is None or scores[candidate] > scores[best]:
            best, best_model = candidate, content
    details.update(calibration_percentile=best, held_out_val_images=len(held_out),
                   held_out_val_acc_by_percentile={f"{candidate:g}": score for candidate, score in scores.items()})
    return best_model, details


def prepare_output_folder(out_dir):
    """Check and create the export's folder before any conversion: not a file, not under one, not a
    folder of runs (beside a model, never among the runs of model/kd_model/)."""
    files.check_output_path(out_dir, "output folder", folder=True)
    stages.refuse_folder_of_runs(out_dir)
    files.create_output_folder(out_dir)


def export_tflite(model_path, split, out_dir=None, batch_size=128, calibration_images=DEFAULT_CALIBRATION_IMAGES,
                  calibration_percentile=None, seed=0, keras_test_acc=None, network=None):
    """Write float32 and int8 .tflite files and export.json into `out_dir` (default: the model's folder).

    Returns the report: each file's size and test accuracy (TFLite interpreter over split.x_test)
    beside the Keras model's (`keras_test_acc`, measured here when not given). `network` is the
    model already loaded from `model_path`, if any.
    """
    if network is None:  # any Keras classifier: what evaluate_model.py and the pruning stage accept
        network = checkpoints.load_model(model_path)
    out_dir = out_dir or os.path.dirname(os.path.abspath(model_path))
    prepare_output_folder(out_dir)
    files.remove_temporaries(out_dir)  # of a killed earlier export
    if keras_test_acc is None:
        from cnn_compression import metrics

        keras_test_acc = metrics.accuracy(network, split.x_test, split.y_test, batch_size)

    started = time.perf_counter()
    float_model = float_tflite(network)
    float_seconds = time.perf_counter() - started
    started = time.perf_counter()
    int8_model, int8_details = convert_int8(float_model, split, calibration_images, calibration_percentile, seed, batch_size)
    int8_seconds = time.perf_counter() - started

    result = {
        "model_path": model_path,
        "out_dir": out_dir,
        "test_images": len(split.y_test),
        "data_source": split.source,
        "keras": {"path": model_path, "file_mb": os.path.getsize(model_path) / 1e6, "test_acc": keras_test_acc},
    }
    contents = {"float32": float_model, "int8": int8_model}
    for kind, seconds, extra in (("float32", float_seconds, {}), ("int8", int8_seconds, int8_details)):
        started = time.perf_counter()
        test_acc = tflite_accuracy(contents[kind], split.x_test, split.y_test, batch_size)
        result[kind] = {"path": os.path.join(out_dir, FLOAT_NAME if kind == "float32" else INT8_NAME),
                        "file_mb": len(contents[kind]) / 1e6, "test_acc": test_acc, "conversion_seconds": seconds,
                        "test_seconds": time.perf_counter() - started, **extra}
    if result["int8"]["test_acc"] is not None:
        result["int8_minus_float32_points"] = 100 * (result["int8"]["test_acc"] - result["float32"]["test_acc"])
    result["versions"] = files.versions()
    # All measured first, then written back to back (each atomically), the report last.
    for kind, content in contents.items():
        files.write_bytes(result[kind]["path"], content)
    files.write_json(os.path.join(out_dir, REPORT_NAME), result)
    return result


def format_report(result):
    lines = [f"{'':16} {'size':>9}  {'test accuracy':>13}"]
    for label, key in (("Keras .h5", "keras"), ("TFLite float32", "float32"), ("TFLite int8", "int8")):
        lines.append(f"{label:16} {result[key]['file_mb']:6.2f} MB  {results.percent(result[key]['test_acc'], 'n/a'):>13}")
    int8 = result["int8"]
    summary = f"int8: {result['float32']['file_mb'] / int8['file_mb']:.1f}x smaller than float32"
    if "int8_minus_float32_points" in result:
        summary += f", {result['int8_minus_float32_points']:+.2f} points"
    lines.append(f"{summary}; float32 input and output; ranges from {int8['calibration_images']} validation images "
                 f"at percentile {int8['calibration_percentile']:g}")
    lines.append(f"wrote {result['float32']['path']}, {int8['path']} and {os.path.join(result['out_dir'], REPORT_NAME)}")
    return "\n".join(lines)
