"""Stage 1: train the baseline ResNet50 on CIFAR-10.

    python train_base_model.py --save_folder=./model/base_model --model_path=./model/pretrained_resnet50.h5

Writes <save_folder>/model.h5 (best validation accuracy), history.json and config.json.
Rerunning the same command resumes an interrupted run and skips a finished one.
"""

import os
import sys

import cnn_compression
from cnn_compression import checkpoints
from cnn_compression import cli
from cnn_compression import stages
from cnn_compression import training

ORIGINAL_PRETRAINED_PATH = "./model/pretrained_resnet50.h5"


def parse_args(argv=None):
    parser = cli.Parser(description="Train the baseline ResNet50 on CIFAR-10.")
    parser.add_argument("--save_folder", default="./model/base_model")
    parser.add_argument("--model_path", default=None,
                        help="optional pretrained .h5 (a whole model or weights, e.g. keras.applications ResNet50 "
                             "ImageNet weights); layers load by name, a classifier of another shape is skipped")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished or different run in --save_folder")
    cli.add_data_flags(parser)
    cli.add_model_flags(parser)
    cli.add_training_flags(parser, epoch_num=200, learning_rate=0.01)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cnn_compression.setup()
    from cnn_compression import data
    import model as resnet

    pretrained = args.model_path
    from_scratch_note = None
    if pretrained and not os.path.exists(pretrained) and os.path.normpath(pretrained) == os.path.normpath(ORIGINAL_PRETRAINED_PATH):
        # The original README's command names this file; without it, train from scratch and say so
        # (once the run has started: a refused run prints its one error line only).
        from_scratch_note = (f"note: no pretrained weights at {pretrained}; training from scratch "
                             "(save keras.applications.ResNet50(weights='imagenet') there to start from ImageNet)")
        pretrained = None
    # Every input is checked before the output folder is created or touched.
    strategy, folder = stages.start_stage(args, args.save_folder)
    training.set_seed(args.seed)
    split = stages.load_split(args)
    train_data = data.TrainingData(split.x_train, split.y_train, args.batch_size, args.seed, args.class_num)
    with strategy.scope():
        network = resnet.build_resnet50(resnet.width_spec(args.width), args.stem, args.class_num)
        training.compile_classifier(network, args, train_data.steps_per_epoch)
    loaded_layers = None
    if pretrained:  # also on a resume: a backup, if there is one, then replaces these weights
        loaded_layers, skipped = checkpoints.load_weights_by_name(network, pretrained)
    state = stages.enter_stage(folder, args, stages.input_fingerprints(split, {"pretrained": pretrained} if pretrained else None))
    if state is None:
        return
    if from_scratch_note:
        print(from_scratch_note, file=sys.stderr)
    if pretrained:
        print(f"loaded {loaded_layers} layers by name from {pretrained}"
              + (f"; skipped {len(skipped)} of another shape ({', '.join(skipped)})" if skipped else ""))
    print(f"data: {split.sizes()} from {split.source}; parameters: {resnet.count_parameters(network):,}; "
          f"{'resuming' if state == 'resume' else 'starting'} in {folder}"
          + (f"; {strategy.num_replicas_in_sync} replicas" if args.distribute != "none" else ""))
    val_data = data.make_dataset(split.x_val, split.y_val, args.batch_size, class_num=args.class_num)
    history = training.fit_stage(network, train_data, val_data, folder, args)
    results = stages.close_stage(folder, args, history, split, parameters=resnet.count_parameters(network),
                                 pretrained_layers_loaded=loaded_layers)
    print(f"best validation accuracy {results['best_val_acc']:.4f} (epoch {results['best_epoch']}); "
          f"test accuracy {results['test_acc']:.4f}; saved {os.path.join(folder, 'model.h5')}")


if __name__ == "__main__":
    cli.run(main)
