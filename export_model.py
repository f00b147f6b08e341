"""Export any stage's model to TensorFlow Lite: float32, and int8 post-training quantization.

    python export_model.py --model_path=./model/base_model/model.h5

Writes model_float32.tflite, model_int8.tflite and export.json beside the model (or into
--out_dir), and prints each file's size and test accuracy, measured by running the TFLite
interpreter over the test set, next to the Keras model's own. The conversion, the int8
calibration and the measurements are cnn_compression.tflite's; `evaluate_model.py
--export_tflite` calls the same `tflite.export_tflite`.
"""

import cnn_compression
from cnn_compression import checkpoints
from cnn_compression import cli
from cnn_compression import classifiers
from cnn_compression import tflite


def percent(text):
    return cli.number(text, float, strictly_above=0, maximum=100)


def parse_args(argv=None):
    parser = cli.Parser(description="Export a checkpoint (our ResNet50 or any Keras classifier on 32x32 images) to float32 "
                                    "and int8 TensorFlow Lite models.")
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--out_dir", default=None, help="folder for the .tflite files and export.json (default: the model's folder)")
    parser.add_argument("--calibration_images", type=cli.positive_int, default=tflite.DEFAULT_CALIBRATION_IMAGES,
                        help="validation images (class-stratified, fixed by --seed) that calibrate the int8 ranges; "
                             "at most half the validation split, the other half chooses the percentile")
    parser.add_argument("--calibration_percentile", type=percent, default=None,
                        help="each activation range covers the per-image extremes of this percent of the calibration "
                             f"images (100: plain min/max); default: the best of {', '.join(f'{p:g}' for p in tflite.CANDIDATE_PERCENTILES)} "
                             "on held-out validation images")
    cli.add_data_flags(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cnn_compression.setup()
    from cnn_compression import data

    # Reject bad files and an output folder that cannot be made before loading the data set.
    network = checkpoints.load_model(args.model_path, check=lambda model: classifiers.check_any_model(
        model, len(data.CLASS_NAMES), "export"))
    if args.out_dir:
        tflite.prepare_output_folder(args.out_dir)
    split = data.load_split(args.dataset, args.data_dir, args.train_size, args.seed)
    result = tflite.export_tflite(args.model_path, split, args.out_dir, args.batch_size, args.calibration_images,
                                  args.calibration_percentile, args.seed, network=network)
    print(tflite.format_report(result))


if __name__ == "__main__":
    cli.run(main)
