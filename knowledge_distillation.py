"""Stage 3: distil a (pruned) teacher into a small student.

    python knowledge_distillation.py --root_folder=./model/pruned_model/iter15 --lambda1=0.7, --lambda2=0.3, --lambda3=0.2, --regressor_name=conv1x1
    python knowledge_distillation.py --teacher_path teacher.h5 --student_compression 4 --hint_layers block_6_add:block_6_add

(the original README's stray commas are accepted). The teacher is <root_folder>/model.h5 or
--teacher_path (.h5 or .keras), frozen and run in inference mode: our ResNet50, or any functional
classifier of 32x32x3 raw images (docs/any_model.md). The student is --student_path, or built from
the teacher: for our ResNet50 a width spec (students.py), for any other model its own graph with every
channel group narrowed to --student_compression. Writes <save_folder>/model.h5 (the best-validation
student alone, an ordinary Keras model), history.json (per epoch: the base keys plus every loss
term) and config.json. --no_teacher trains the same student on labels alone, the baseline.
Rerunning resumes.
"""

import os
import sys

import cnn_compression
from cnn_compression import checkpoints
from cnn_compression import cli
from cnn_compression import files
from cnn_compression import metrics
from cnn_compression import stages
from cnn_compression import training

DEFAULT_BASE = "./model/base_model/model.h5"


# ---------------------------------------------------------------------------------------------
# The base model's stage widths (what --student_divisor divides)


def base_mismatch(base_description, teacher_description):
    """Why `base` cannot be the model `teacher` was pruned from (None when it can be)."""
    base_spec, base_stem, base_classes, base_shape = base_description
    spec, stem, classes, shape = teacher_description
    if (base_stem, base_classes, base_shape) != (stem, classes, shape):
        return f"its stem/classes/input ({base_stem}, {base_classes}, {base_shape}) differ from the teacher's ({stem}, {classes}, {shape})"
    if base_spec["stem"] != spec["stem"]:
        return f"its stem width {base_spec['stem']} differs from the teacher's {spec['stem']}"
    # Pruning only removes channels: every teacher width is at most the base's.
    wider = [f"block {index + 1}" for index, (b, t) in enumerate(zip(base_spec["blocks"], spec["blocks"]))
             if t[0] > b[0] or t[1] > b[1]]
    wider += [f"stage {index + 1}" for index, (b, t) in enumerate(zip(base_spec["stages"], spec["stages"])) if t > b]
    if wider:
        return f"the teacher is wider than it in {', '.join(wider[:4])}{' ...' if len(wider) > 4 else ''}"
    return None


def _pruning_records(root_folder):
    """config.json files of the pruning run that wrote `root_folder` (the iteration folder, then its root)."""
    import json

    folder = os.path.abspath(root_folder)
    for candidate in (folder, os.path.dirname(folder)):
        path = os.path.join(candidate, "config.json")
        try:
            with open(path) as handle:
                record = json.load(handle)
        except (OSError, ValueError):
            continue
        arguments = record.get("arguments") if isinstance(record, dict) else None
        if isinstance(arguments, dict):
            yield path, arguments


def find_base_model(teacher, root_folder, base_model_path=None, default_base_path=None):
    """The base (unpruned) model `teacher` was pruned from: (description, path, notes), or
    (None, None, notes) when none is found.

    In order: an explicit `base_model_path` (must be the teacher's base, else ValueError); the
    default base path when it exists and fits the teacher; the base recorded in the pruning run's
    config.json. `description` is `model.describe_model`'s (spec, stem, class_num, input_shape).
    """
    import model as resnet

    teacher_description = resnet.describe_model(teacher)
    notes = []

    def from_file(path, what):
        base = checkpoints.load_model(path, what, check=resnet.describe_model)
        description = resnet.describe_model(base)
        return description, base_mismatch(description, teacher_description)

    if base_model_path:
        description, mismatch = from_file(base_model_path, "base model")
        if mismatch:
            raise ValueError(f"--base_model_path {base_model_path} is not the teacher's base model: {mismatch}")
        return description, base_model_path, notes
    candidates = []
    if default_base_path and os.path.exists(default_base_path):
        candidates.append((default_base_path, "default base model"))
    for record_path, arguments in _pruning_records(root_folder):
        recorded = arguments.get("base_model_path")
        if isinstance(recorded, str) and os.path.exists(recorded):
            candidates.append((recorded, f"base model recorded in {record_path}"))
    for path, what in candidates:
        try:
            description, mismatch = from_file(path, what)
        except cli.UserError as error:
            notes.append(f"ignoring {what}: {error}")
            continue
        if mismatch:
            notes.append(f"ignoring {what} {path}: {mismatch}")
            continue
        return description, path, notes
    return None, None, notes


def resolve_base_stage_widths(teacher, root_folder, base_model_path=None, default_base_path=None):
    """The base (unpruned) model's four stage widths and where they came from: (widths, source, notes).

    From the base model `find_base_model` finds; else the teacher's own stage widths when its
    pruning run did not prune them (no --prune_residual), or, with no record at all, with a note.
    --prune_residual makes the teacher's stage widths smaller than the base's, so they are the
    last resort.
    """
    import model as resnet

    description, path, notes = find_base_model(teacher, root_folder, base_model_path, default_base_path)
    if description is not None:
        return description[0]["stages"], path, notes
    teacher_description = resnet.describe_model(teacher)
    records = list(_pruning_records(root_folder))
    teacher_stages = teacher_description[0]["stages"]
    for record_path, arguments in records:
        if "prune_residual" in arguments:
            if arguments["prune_residual"]:
                raise ValueError(
                    f"the teacher's stage widths were pruned (--prune_residual in {record_path}) and its base model "
                    "is not found: pass --base_model_path or --student_stage_widths"
                )
            return teacher_stages, f"teacher (stage widths unpruned per {record_path})", notes
    notes.append("no base model found: taking the teacher's stage widths as the base's "
                 "(pass --base_model_path or --student_stage_widths if its residual stream was pruned)")
    return teacher_stages, "teacher", notes


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


def hint_layers(text):
    """teacher_layer:student_layer pairs, comma-separated, e.g. block_6_add:block_6_add,out_relu:out_relu."""
    import argparse

    pairs = []
    for part in (part.strip() for part in text.strip().rstrip(",").split(",")):
        names = part.split(":")
        if len(names) != 2 or not all(name.strip() for name in names):
            raise argparse.ArgumentTypeError(f"{part!r} is not a teacher_layer:student_layer pair")
        pairs.append([name.strip() for name in names])
    return pairs


def parse_args(argv=None):
    cli.import_tensorflow()  # quietly, before distillation (Keras) for its regressor names
    import distillation

    parser = cli.Parser(description="Distil a (pruned) teacher into a small student: our ResNet50 or any functional classifier.")
    teacher = parser.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--root_folder", help="a pruning iteration folder holding the teacher's model.h5")
    teacher.add_argument("--teacher_path", help="the teacher model file (.h5 or .keras): our ResNet50 or any functional "
                                                "classifier of 32x32x3 raw images")
    parser.add_argument("--save_folder", default="./model/kd_model")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished or different run in --save_folder")
    loss = parser.add_argument_group("loss")
    loss.add_argument("--lambda1", type=cli.non_negative_float, default=0.7, help="weight of L_backbone (0: off)")
    loss.add_argument("--lambda2", type=cli.non_negative_float, default=0.3, help="weight of L_intermediate (0: off)")
    loss.add_argument("--lambda3", type=cli.non_negative_float, default=0.2, help="weight of L_adversarial (0: off)")
    loss.add_argument("--regressor_name", type=cli.choice_text, choices=distillation.REGRESSORS, default="conv1x1",
                      help="conv1x1: trained 1x1 convs; constant: fixed channel average; vid: variational information distillation")
    loss.add_argument("--hint_layers", type=hint_layers, default=None, metavar="T:S,...",
                      help="teacher_layer:student_layer pairs of L_intermediate, each map pair of the same spatial size "
                           "(default: our ResNet50's four stage outputs)")
    loss.add_argument("--temperature", type=cli.positive_float, default=4.0, help="softmax temperature T of L_backbone")
    loss.add_argument("--kd_beta", type=unit_interval, default=0.9,
                      help="share of the soft (KL) term in L_backbone; 1 - kd_beta goes to label cross-entropy")
    loss.add_argument("--discriminator_learning_rate", type=cli.positive_float, default=1e-4, help="Adam's rate for the discriminator")
    loss.add_argument("--no_teacher", action="store_true",
                      help="train the same student on labels alone (cross-entropy): the baseline")
    loss.add_argument("--teacher_batch_norm", type=cli.choice_text, choices=("keep", "fold"), default="keep",
                      help="keep: run the frozen teacher as loaded; fold: its BatchNorms merged into the convolutions "
                           "before them (the same outputs up to float rounding; the speed-up is still being measured, "
                           "docs/distillation.md)")
    student = parser.add_argument_group("student")
    student.add_argument("--student_path", default=None,
                         help="the student model file (.h5 or .keras): any functional classifier, trained from its weights")
    student.add_argument("--reinitialise_student", action="store_true",
                         help="start --student_path's architecture from fresh weights instead of its own")
    student.add_argument("--student_divisor", type=cli.positive_int, default=32,
                         help="ResNet50 teacher: student stage widths = the base model's stage widths // this")
    student.add_argument("--student_stage_widths", type=stage_widths, default=None, metavar="W1,W2,W3,W4",
                         help="ResNet50 teacher: explicit student stage widths (overrides --student_divisor)")
    student.add_argument("--student_compression", type=compression, default=None, metavar="R",
                         help="ResNet50 teacher: widths with base parameters / student parameters = R (within 3%%; e.g. "
                              "12.82, the original's), stage widths first, inner widths if needed. Any other teacher: "
                              "its channel groups narrowed by one factor to teacher parameters / student parameters = R")
    student.add_argument("--student_round_to", type=cli.positive_int, default=1, metavar="N",
                         help="with --student_compression: every student width a multiple of N where the teacher's "
                              "allows (8 on CPUs: oneDNN runs whole vector blocks; 1.3-1.4x faster epochs at the same "
                              "parameters), filled back up to R")
    student.add_argument("--base_model_path", default=None,
                         help=f"ResNet50 teacher: the unpruned base model whose stage widths are divided (default {DEFAULT_BASE} when it fits the teacher)")
    cli.add_data_flags(parser)
    cli.add_training_flags(parser, epoch_num=200, learning_rate=0.01, learning_rate_flag="--student_learning_rate")
    return parser.parse_args(argv)


def is_our_resnet(network):
    import model as resnet

    try:
        resnet.describe_model(network)
    except resnet.NotOurResNetError:
        return False
    return True


def load_classifier(path, what, precision, class_num):
    """A model file the stage trains or learns from: our ResNet50 or any classifier of the contract
    (classifiers.check_any_model), recast to the run's precision (saved models are float32)."""
    from cnn_compression import classifiers

    network = checkpoints.load_model(path, what, check=lambda model: classifiers.check_any_model(model, class_num, "distillation"))
    return checkpoints.recast(network, precision)


def resnet_student(teacher, args):
    """(student spec, base stage widths, where they came from, notes) for our ResNet50 teacher."""
    import model as resnet
    import students

    root_folder = args.root_folder or os.path.dirname(os.path.abspath(args.teacher_path))
    base_widths, base_source, notes = resolve_base_stage_widths(teacher, root_folder, args.base_model_path, DEFAULT_BASE)
    spec, stem, class_num, _ = resnet.describe_model(teacher)
    if args.student_compression:
        base, base_source, _ = find_base_model(teacher, root_folder, args.base_model_path, DEFAULT_BASE)
        if base is None:
            raise ValueError("--student_compression counts against the base model, which is not found: pass --base_model_path")
        return students.spec_for_compression(spec, base[0], stem, class_num, args.student_compression,
                                             round_to=args.student_round_to), base_widths, base_source, notes
    return students.student_spec(spec, base_widths, args.student_divisor, args.student_stage_widths), base_widths, base_source, notes


def make_student(teacher, args, class_num, strategy):
    """(student, {what describes it}, a line for the log, notes) under `strategy`: --student_path,
    our ResNet50's width-spec student, or any teacher's narrowed copy. ValueError or UserError when
    the flags cannot make one."""
    import model as resnet
    import students

    ours = is_our_resnet(teacher)
    if args.student_path:
        for flag in ("student_compression", "student_stage_widths"):
            if getattr(args, flag):
                raise ValueError(f"--student_path is the student: --{flag} has nothing to choose")
        with strategy.scope():
            student = load_classifier(args.student_path, "student model", args.precision, class_num)
            if args.reinitialise_student:
                student = students.reinitialised(student)
        return student, {"student": files.fingerprint_file(args.student_path)}, \
            f"student {args.student_path}{' re-initialised' if args.reinitialise_student else ''}", []
    if args.reinitialise_student:
        raise ValueError("--reinitialise_student re-initialises --student_path, which is not given")
    if ours:
        spec, base_widths, base_source, notes = resnet_student(teacher, args)
        _, stem, class_num, input_shape = resnet.describe_model(teacher)
        with strategy.scope():
            student = resnet.build_resnet50(spec, stem, class_num, input_shape, name="student")
        described = {"student_spec": spec, "base_stage_widths": base_widths, "base_stage_widths_from": base_source}
        return student, described, f"stage widths {spec['stages']} (base {base_widths} from {base_source})", \
            ([] if args.student_stage_widths else notes)
    for flag in ("student_stage_widths", "base_model_path"):
        if getattr(args, flag):
            raise ValueError(f"--{flag} describes a ResNet50 student; {teacher.name} is another model "
                             "(pass --student_compression or --student_path)")
    if not args.student_compression:
        raise ValueError(f"{teacher.name} is not our ResNet50: pass --student_compression R (its own graph narrowed) "
                         "or --student_path")
    with strategy.scope():
        student, widths, achieved = students.narrowed_student(teacher, args.student_compression,
                                                              round_to=args.student_round_to)
    return student, {"student_widths": widths}, f"{teacher.name}'s channel groups narrowed {achieved:.2f}x", []


def loss_line(distiller):
    """The start-up log's account of the student's loss: only the terms a weight switches on."""
    import distillation

    if distiller.teacher is None:
        return "labels only (cross-entropy)"
    terms = " + ".join(f"{weight:g} * {name}" for name, weight in zip(distillation.LOSS_TERMS, distiller.lambdas) if weight)
    return f"loss {terms}{' (its discriminator trained alongside)' if distiller.discriminator is not None else ''}"


def inference_teacher(teacher, folder, args, state, hints):
    """(the teacher the Distiller runs, how many of its BatchNorms were folded): with
    --teacher_batch_norm fold, a copy with every foldable BatchNorm merged into its convolution
    (batch_norm_folding), the hinted layers kept. A resumed run keeps what it began with (its backup
    holds the teacher's variables; a run begun before the flag existed ran the teacher as loaded)."""
    from cnn_compression import batch_norm_folding

    if args.no_teacher:
        return None, 0
    mode = args.teacher_batch_norm
    if state == "resume":
        stored = files.read_json(os.path.join(folder, stages.CONFIG_NAME), "config").get("arguments", {})
        mode = stored.get("teacher_batch_norm", "keep")
    if mode == "keep":
        return teacher, 0
    return batch_norm_folding.fold_batch_norms(teacher, keep={pair[0] for pair in hints})


def main(argv=None):
    args = parse_args(argv)
    cnn_compression.setup()
    import keras

    from cnn_compression import data
    import distillation
    import model as resnet

    lambdas = (args.lambda1, args.lambda2, args.lambda3)
    if not args.no_teacher and not any(lambdas):
        raise cli.UserError("--lambda1, --lambda2 and --lambda3 are all 0: nothing to distil "
                            "(pass --no_teacher to train the student on labels alone)")
    if args.hint_layers and not args.lambda2:
        raise cli.UserError("--hint_layers names the pairs of the intermediate term, which --lambda2 0 switches off: "
                            "give --lambda2 a weight or drop --hint_layers")
    if args.student_round_to > 1 and not args.student_compression:
        raise cli.UserError("--student_round_to rounds the widths --student_compression chooses: pass --student_compression R")
    teacher_path = args.teacher_path or os.path.join(args.root_folder, "model.h5")
    if not os.path.exists(teacher_path) and "prued_model" in teacher_path:
        raise cli.UserError(f"no teacher model at {teacher_path} (the original README's typo: pruned_model?)")
    class_num = len(data.CLASS_NAMES)
    # Strategy, this worker's folder (a scratch copy on workers other than the chief), precision;
    # the folder is only checked here: every input is checked before it is created or touched.
    strategy, folder = stages.start_stage(args, args.save_folder)
    with strategy.scope():
        teacher = load_classifier(teacher_path, "teacher model", args.precision, class_num)
    if args.student_compression and args.student_stage_widths:
        raise cli.UserError("--student_compression and --student_stage_widths each choose the student's widths: pass one")
    training.set_seed(args.seed)  # the student's fresh weights
    try:
        student, described, student_line, notes = make_student(teacher, args, class_num, strategy)
    except ValueError as error:
        raise cli.UserError(str(error)) from None
    try:
        # The pairs are checked here, before the output folder is touched; the Distiller checks them again.
        hints = distillation.hint_pairs(teacher, student, args.hint_layers) if args.lambda2 and not args.no_teacher else []
    except ValueError as error:
        raise cli.UserError(f"{error}{'' if args.hint_layers else ' (--hint_layers T:S,...; or --lambda2 0)'}") from None
    teacher_parameters = resnet.count_parameters(teacher)
    student_parameters = resnet.count_parameters(student)
    if student_parameters >= teacher_parameters:
        # Not refused: a student as large as its teacher (born-again networks) is a research use of its own.
        notes.append(f"the student ({student_parameters:,} parameters) is not smaller than its teacher "
                     f"({teacher_parameters:,}): this run compresses nothing")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    split = stages.load_split(args)
    inputs = stages.input_fingerprints(
        split, {"teacher": None if args.no_teacher else teacher_path},
        **{key: value for key, value in described.items() if key in ("student_spec", "student", "student_widths")})
    state = stages.enter_stage(folder, args, inputs)
    if state is None:
        return
    train_data = data.TrainingData(split.x_train, split.y_train, args.batch_size, args.seed, class_num)
    with strategy.scope():
        running_teacher, folded = inference_teacher(teacher, folder, args, state, hints)
        distiller = distillation.Distiller(
            student, running_teacher, lambdas, args.regressor_name,
            args.temperature, args.kd_beta, args.label_smoothing, hint_layers=hints or None,
        )
        distiller.compile(
            optimizer=training.make_optimizer(args, train_data.steps_per_epoch, args.student_learning_rate),
            discriminator_optimizer=training.scaled_for_precision(keras.optimizers.Adam(args.discriminator_learning_rate)),
        )
    print(f"data: {split.sizes()} from {split.source}; teacher {teacher_parameters:,} parameters, student "
          f"{student_parameters:,} ({teacher_parameters / student_parameters:.2f}x smaller), {student_line}; "
          f"{loss_line(distiller)}{'; hints ' + ', '.join(f'{t}:{s}' for t, s in hints) if hints else ''}"
          f"{f'; {folded} teacher BatchNorms folded' if folded else ''}; "
          f"{'resuming' if state == 'resume' else 'starting'} in {folder}")
    val_data = data.make_dataset(split.x_val, split.y_val, args.batch_size, class_num=class_num)
    history = training.fit_stage(distiller, train_data, val_data, folder, args, model_to_save=student)

    results = stages.close_stage(
        folder, args, history, split,
        teacher_test_acc=metrics.accuracy(teacher, split.x_test, split.y_test, args.batch_size),
        parameters=student_parameters, teacher_parameters=teacher_parameters,
        compression_vs_teacher=teacher_parameters / student_parameters, **described,
    )
    saved = os.path.join(folder, "model.h5")
    also = checkpoints.keras_path(saved)
    print(f"best validation accuracy {results['best_val_acc']:.4f} (epoch {results['best_epoch']}); "
          f"student test accuracy {results['test_acc']:.4f} (teacher {results['teacher_test_acc']:.4f}); "
          f"saved {saved}{f' and {also}' if os.path.exists(also) else ''}")


if __name__ == "__main__":
    cli.run(main)
