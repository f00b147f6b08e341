"""Stage 4: measure any stage's model.

    python evaluate_model.py --model_path=./model/base_model/model.h5

Prints test and validation accuracy, parameters, MACs, file size and CPU latency (batch 1 and
128) in TensorFlow and as a float32 TFLite model; against --base_model_path also the compression
rate, MAC ratio and measured speed-ups.
--export_tflite also writes float32 and int8 TFLite models beside the model (the export of
export_model.py: `cnn_compression.tflite.export_tflite`).
"""

import os
import statistics
import sys
import time

import cnn_compression
from cnn_compression import checkpoints
from cnn_compression import classifiers
from cnn_compression import cli
from cnn_compression import metrics
from cnn_compression import results
from cnn_compression import files
from cnn_compression import tflite

DEFAULT_BASE = "./model/base_model/model.h5"


def parse_args(argv=None):
    parser = cli.Parser(description="Evaluate a checkpoint of any stage (our ResNet50 or any Keras classifier on 32x32 images).")
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--base_model_path", default=None,
                        help=f"compare against this model (default {DEFAULT_BASE} when it exists and, for our "
                             "ResNet50, has the model's stem, classes and input)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--latency_repeats", type=cli.non_negative_int, default=20,
                        help="timed repeats at batch 1 after warm-up, a quarter as many (at least 3) at batch 128; 0 skips latency")
    parser.add_argument("--export_tflite", action="store_true",
                        help="also write float32 and int8 TFLite models beside the model (export_model.py with its defaults)")
    cli.add_data_flags(parser)
    return parser.parse_args(argv)


def base_mismatch(network, base):
    """Why `base` cannot be the model `network` was compressed from (None when it can, or when
    either is not our ResNet50, whose shape alone tells): another stem, class count or input."""
    import model as resnet

    try:
        ours, theirs = resnet.describe_model(network)[1:], resnet.describe_model(base)[1:]  # (stem, classes, input)
    except resnet.NotOurResNetError:
        return None
    if ours != theirs:
        return f"its stem, classes and input {theirs} differ from the model's {ours}"
    return None


def choose_base(network, base_model_path=None, check=None):
    """The base to compare `network` with: --base_model_path (checked to open, and by `check`), else
    DEFAULT_BASE when it exists and `base_mismatch` has no objection (a note on stderr when it has),
    else None."""
    if base_model_path:
        checkpoints.load_model(base_model_path, "base model", check)
        return base_model_path
    if not os.path.exists(DEFAULT_BASE):
        return None
    mismatch = base_mismatch(network, checkpoints.load_model(DEFAULT_BASE, "default base model"))
    if mismatch:
        print(f"note: not comparing against the default base {DEFAULT_BASE}: {mismatch} (pass --base_model_path)",
              file=sys.stderr)
        return None
    return DEFAULT_BASE


def measure_latency(network, batch_size, repeats, warmup=3):
    """Median seconds of one inference call on `batch_size` images, through a compiled tf.function."""
    import numpy as np
    import tensorflow as tf

    _, height, width, channels = network.input_shape
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (batch_size, height, width, channels)), tf.float32)
    infer = tf.function(lambda x: network(x, training=False))
    for _ in range(warmup):
        infer(images).numpy()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        infer(images).numpy()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def measure(path, split, batch_size, repeats):
    import model as resnet
    import prune

    network = checkpoints.load_model(path)
    parameters, macs = prune.model_size(network)
    measured = metrics.accuracies(network, {"test": (split.x_test, split.y_test), "val": (split.x_val, split.y_val)},
                                  batch_size)
    result = {
        "model_path": path,
        "test_acc": measured["test"],
        "test_images": len(split.y_test),
        "val_acc": measured["val"],
        "parameters": parameters,
        "macs": macs,
        "file_mb": os.path.getsize(path) / 1e6,
    }
    try:
        spec, stem, _, _ = resnet.describe_model(network)
        result.update(stem=stem, width_spec=spec)
    except resnet.NotOurResNetError:  # any other Keras classifier (e.g. pruned by prune_model.py): no width spec
        pass
    if repeats:
        result["latency_ms_batch1"] = 1e3 * measure_latency(network, 1, repeats)
        result["latency_ms_batch128"] = 1e3 * measure_latency(network, 128, max(3, repeats // 4))
        # The deployed form: TFLite float32 (BatchNorm folded, XNNPACK), where per-op overhead is small.
        content = tflite.float_tflite(network)
        result["tflite_latency_ms_batch1"] = 1e3 * tflite.tflite_latency(content, 1, repeats)
        result["tflite_latency_ms_batch128"] = 1e3 * tflite.tflite_latency(content, 128, max(3, repeats // 4))
    return result


def main(argv=None):
    args = parse_args(argv)
    cnn_compression.setup()
    from cnn_compression import data

    def classifier(model):
        classifiers.check_any_model(model, len(data.CLASS_NAMES), "evaluation")

    network = checkpoints.load_model(args.model_path, check=classifier)  # bad files before the data set
    base_path = choose_base(network, args.base_model_path, classifier)
    if args.json:
        files.check_output_path(args.json, "--json")
        for flag, path in (("--model_path", args.model_path), ("--base_model_path", base_path)):
            if path and os.path.exists(args.json) and os.path.samefile(args.json, path):
                raise cli.UserError(f"--json {args.json} is the {flag} file; name a .json file of its own")
    split = data.load_split(args.dataset, args.data_dir, args.train_size, args.seed)
    result = measure(args.model_path, split, args.batch_size, args.latency_repeats)
    if base_path and os.path.abspath(base_path) != os.path.abspath(args.model_path):
        base = measure(base_path, split, args.batch_size, args.latency_repeats)
        result["base"] = {key: base[key] for key in base if key != "width_spec"}
        result["compression_rate"] = base["parameters"] / result["parameters"]
        result["mac_ratio"] = base["macs"] / result["macs"]
        for runtime in ("", "tflite_"):
            for batch in ("batch1", "batch128"):
                if f"{runtime}latency_ms_{batch}" in result:
                    result[f"{runtime}speedup_{batch}"] = base[f"{runtime}latency_ms_{batch}"] / result[f"{runtime}latency_ms_{batch}"]
    print(format_report(result))
    if args.json:
        files.write_json(args.json, result)
    if args.export_tflite:
        exported = tflite.export_tflite(args.model_path, split, batch_size=args.batch_size, seed=args.seed,
                                        keras_test_acc=result["test_acc"])
        print(tflite.format_report(exported))


def format_report(result):
    lines = [
        f"model            {result['model_path']}",
        f"test accuracy    {results.percent(result['test_acc'], 'n/a')}",
        f"val accuracy     {results.percent(result['val_acc'], 'n/a')}",
        f"parameters       {result['parameters']:,}",
        f"MACs             {result['macs'] / 1e6:,.2f} M",
        f"file size        {result['file_mb']:.2f} MB",
    ]
    if "latency_ms_batch1" in result:
        lines += [f"latency batch 1  {result['latency_ms_batch1']:.2f} ms TensorFlow, {result['tflite_latency_ms_batch1']:.2f} ms TFLite float32",
                  f"latency batch 128 {result['latency_ms_batch128']:.1f} ms TensorFlow, {result['tflite_latency_ms_batch128']:.1f} ms TFLite float32"]
    if "base" in result:
        lines += [f"compression rate {result['compression_rate']:.2f}x parameters against {result['base']['model_path']}",
                  f"MAC ratio        {result['mac_ratio']:.2f}x"]
        if "speedup_batch1" in result:
            lines += [f"speed-up         {result['speedup_batch1']:.2f}x at batch 1, {result['speedup_batch128']:.2f}x at batch 128 (TensorFlow); "
                      f"{result['tflite_speedup_batch1']:.2f}x, {result['tflite_speedup_batch128']:.2f}x (TFLite float32)"]
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run(main)
