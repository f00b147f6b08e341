"""Stage 3: distil a pruned teacher into a small student ResNet50.

    python knowledge_distillation.py --root_folder=./model/pruned_model/iter15 --lambda1=0.7, --lambda2=0.3, --lambda3=0.2, --regressor_name=conv1x1

(the original README's stray commas are accepted). The teacher is <root_folder>/model.h5, frozen
and run in inference mode. Writes <save_folder>/model.h5 (the best-validation student alone, an
ordinary ResNet50), history.json (per epoch: the base keys plus every loss term) and config.json.
--no_teacher trains the same student on labels alone, the baseline. Rerunning resumes.
"""

import math
import os
import sys

from cnn_compression import checkpoints
from cnn_compression import cli
from cnn_compression import files
from cnn_compression import multi_worker
from cnn_compression import metrics
from cnn_compression import stages
from cnn_compression import training

DEFAULT_BASE = "./model/base_model/model.h5"


def stage_widths(text):
    """Four positive stage widths, e.g. 8,16,32,64."""
    import argparse

    parts = [part for part in text.strip().rstrip(",").split(",")]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"{text!r} is not four comma-separated widths")
    return [cli.positive_int(part) for part in parts]


def compression(text):
    return cli.number(text, float, strictly_above=1)


def unit_interval(text):
    return cli.number(text, float, minimum=0, maximum=1)


def parse_args(argv=None):
    cli.import_tensorflow()  # quietly, before distillation (Keras) for its regressor names
    import distillation

    parser = cli.Parser(description="Distil a (pruned) teacher ResNet50 into a small student ResNet50.")
    parser.add_argument("--root_folder", required=True, help="a pruning iteration folder holding the teacher's model.h5")
    parser.add_argument("--save_folder", default="./model/kd_model")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished or different run in --save_folder")
    loss = parser.add_argument_group("loss")
    loss.add_argument("--lambda1", type=cli.non_negative_float, default=0.7, help="weight of L_backbone (0: off)")
    loss.add_argument("--lambda2", type=cli.non_negative_float, default=0.3, help="weight of L_intermediate (0: off)")
    loss.add_argument("--lambda3", type=cli.non_negative_float, default=0.2, help="weight of L_adversarial (0: off)")
    loss.add_argument("--regressor_name", type=cli.choice_text, choices=distillation.REGRESSORS, default="conv1x1",
                      help="conv1x1: trained 1x1 convs; constant: fixed channel average; vid: variational information distillation")
    loss.add_argument("--temperature", type=cli.positive_float, default=4.0, help="softmax temperature T of L_backbone")
    loss.add_argument("--kd_beta", type=unit_interval, default=0.9,
                      help="share of the soft (KL) term in L_backbone; 1 - kd_beta goes to label cross-entropy")
    loss.add_argument("--discriminator_learning_rate", type=cli.positive_float, default=1e-4, help="Adam's rate for the discriminator")
    loss.add_argument("--no_teacher", action="store_true",
                      help="train the same student on labels alone (cross-entropy): the baseline")
    student = parser.add_argument_group("student")
    student.add_argument("--student_divisor", type=cli.positive_int, default=32,
                         help="student stage widths = the base model's stage widths // this")
    student.add_argument("--student_stage_widths", type=stage_widths, default=None, metavar="W1,W2,W3,W4",
                         help="explicit student stage widths (overrides --student_divisor)")
    student.add_argument("--student_compression", type=compression, default=None, metavar="R",
                         help="choose the student's widths so that base parameters / student parameters is R "
                              "(within 3%%; e.g. 12.82, the original's): stage widths first, inner widths if needed")
    student.add_argument("--base_model_path", default=None,
                         help=f"the unpruned base model whose stage widths are divided (default {DEFAULT_BASE} when it fits the teacher)")
    cli.add_data_flags(parser)
    cli.add_training_flags(parser, epoch_num=200, learning_rate=0.01, learning_rate_flag="--student_learning_rate")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import keras

    from cnn_compression import data
    import distillation
    import model as resnet

    lambdas = (args.lambda1, args.lambda2, args.lambda3)
    if not args.no_teacher and not any(lambdas):
        raise cli.UserError("--lambda1, --lambda2 and --lambda3 are all 0: nothing to distil "
                                 "(pass --no_teacher to train the student on labels alone)")
    teacher_path = os.path.join(args.root_folder, "model.h5")
    if not os.path.exists(teacher_path) and "prued_model" in teacher_path:
        raise cli.UserError(f"no teacher model at {teacher_path} (the original README's typo: pruned_model?)")
    args.precision = training.set_precision(args.precision)  # auto resolved, so config.json records what ran
    strategy = training.distribution_strategy(args)
    with strategy.scope():
        # A saved model is float32: the teacher runs in the student's precision.
        teacher = checkpoints.recast(checkpoints.load_model(teacher_path, "teacher model", check=resnet.describe_model), args.precision)
    if args.student_compression and args.student_stage_widths:
        raise cli.UserError("--student_compression and --student_stage_widths each choose the student's widths: pass one")
    try:
        base_widths, base_source, notes = distillation.resolve_base_stage_widths(
            teacher, args.root_folder, args.base_model_path, DEFAULT_BASE)
        spec, stem, class_num, _ = resnet.describe_model(teacher)
        if args.student_compression:
            base, base_source, _ = distillation.find_base_model(teacher, args.root_folder, args.base_model_path, DEFAULT_BASE)
            if base is None:
                raise ValueError("--student_compression counts against the base model, which is not found: pass --base_model_path")
            student_spec = distillation.spec_for_compression(spec, base[0], stem, class_num, args.student_compression)
        else:
            student_spec = distillation.student_spec(spec, base_widths, args.student_divisor, args.student_stage_widths)
    except ValueError as error:
        raise cli.UserError(str(error)) from None
    if args.student_stage_widths is None:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)

    folder = multi_worker.worker_folder(args.save_folder, strategy)  # a scratch copy on workers other than the chief
    # Every input is checked before the output folder is created or touched.
    stages.check_output_folder(folder)
    split = data.load_split(args.dataset, args.data_dir, args.train_size, args.seed)
    inputs = {"data": split.fingerprint(), "student_spec": student_spec,
              "teacher": None if args.no_teacher else files.fingerprint_file(teacher_path)}
    files.lock_folder(folder)
    state = stages.open_stage(folder, args, inputs)
    if state is None:
        return
    training.set_seed(args.seed)
    steps_per_epoch = math.ceil(len(split.y_train) / args.batch_size)
    with strategy.scope():
        student = resnet.build_resnet50(student_spec, stem, class_num, name="student")
        distiller = distillation.Distiller(
            student, None if args.no_teacher else teacher, lambdas, args.regressor_name,
            args.temperature, args.kd_beta, args.label_smoothing,
        )
        distiller.compile(
            optimizer=training.make_optimizer(args, steps_per_epoch, args.student_learning_rate),
            discriminator_optimizer=training.scaled_for_precision(keras.optimizers.Adam(args.discriminator_learning_rate)),
        )
    teacher_parameters = resnet.count_parameters(teacher)
    student_parameters = resnet.count_parameters(student)
    print(f"data: {split.sizes()} from {split.source}; teacher {teacher_parameters:,} parameters, student "
          f"{student_parameters:,} ({teacher_parameters / student_parameters:.2f}x smaller), stage widths "
          f"{student_spec['stages']} (base {base_widths} from {base_source}); "
          f"{'labels only' if args.no_teacher else 'terms ' + ', '.join(distiller.logged_terms()[2:])}; "
          f"{'resuming' if state == 'resume' else 'starting'} in {folder}")
    train_data = data.make_dataset(split.x_train, split.y_train, args.batch_size, True, args.seed, class_num)
    val_data = data.make_dataset(split.x_val, split.y_val, args.batch_size, class_num=class_num)
    history = training.fit_stage(distiller, train_data, val_data, folder, args, model_to_save=student)

    results = stages.close_stage(
        folder, args, history, split,
        teacher_test_acc=metrics.accuracy(teacher, split.x_test, split.y_test, args.batch_size),
        parameters=student_parameters, teacher_parameters=teacher_parameters,
        compression_vs_teacher=teacher_parameters / student_parameters,
        student_spec=student_spec, base_stage_widths=base_widths, base_stage_widths_from=base_source,
    )
    print(f"best validation accuracy {results['best_val_acc']:.4f} (epoch {results['best_epoch']}); "
          f"student test accuracy {results['test_acc']:.4f} (teacher {results['teacher_test_acc']:.4f}); "
          f"saved {os.path.join(folder, 'model.h5')}")


if __name__ == "__main__":
    cli.run(main)
