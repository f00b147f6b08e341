"""Cost of one distillation step against (teacher forward + plain student training step).

    .venv/bin/python benchmarks/distillation_speed.py --teacher_path ./model/base_model/model.h5

All timings come from one process, interleaved round-robin so that load from other processes on a
shared CPU hits every variant alike; each is the median of --steps timed steps after warm-up.
Without --teacher_path a random ResNet50 of --width is the teacher.
"""

import argparse
import statistics
import time


from cnn_compression import checkpoints  # noqa: E402
import cnn_compression  # noqa: E402
from cnn_compression import cli  # noqa: E402
from cnn_compression import training  # noqa: E402


def main(argv=None):
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher_path", default=None)
    parser.add_argument("--width", type=cli.positive_float, default=0.25, help="width of the random teacher without --teacher_path")
    parser.add_argument("--student_divisor", type=cli.positive_int, default=32)
    parser.add_argument("--batch_size", type=cli.positive_int, default=128)
    parser.add_argument("--steps", type=cli.positive_int, default=20)
    parser.add_argument("--warmup", type=cli.non_negative_int, default=3)
    parser.add_argument("--regressor_name", default="conv1x1")
    args = parser.parse_args(argv)
    cnn_compression.setup()  # TensorFlow quietly, and the fused BatchNorm the stages run
    import keras
    import numpy as np
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # one trace per variant is intended, not a retracing problem
    import distillation
    import model as resnet
    import students

    training.set_seed(0)
    if args.teacher_path:
        teacher = checkpoints.load_model(args.teacher_path)
    else:
        teacher = resnet.build_resnet50(resnet.width_spec(args.width))
    spec = resnet.describe_model(teacher)[0]
    student = students.build_student(teacher, spec["stages"], args.student_divisor)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (args.batch_size, 32, 32, 3)), tf.float32)
    labels = tf.constant(np.eye(10)[rng.integers(0, 10, args.batch_size)], tf.float32)

    plain_args = argparse.Namespace(epoch_num=1, learning_rate=0.01, momentum=0.9, weight_decay=5e-4,
                                    lr_schedule="cosine", warmup_epochs=0, step_epochs=60, label_smoothing=0.0)
    # The plain student step: the same student, compiled as the base stage compiles its model.
    plain = keras.models.clone_model(student)
    training.compile_classifier(plain, plain_args, 1000)
    variants = {"student step": lambda: plain.train_on_batch(images, labels)}
    teacher_forward = tf.function(lambda x: teacher(x, training=False))
    variants["teacher forward"] = lambda: teacher_forward(images)[0, 0].numpy()
    configurations = {"KD step, all three terms": (0.7, 0.3, 0.2), "KD step, L_backbone only": (0.7, 0.0, 0.0),
                      "KD L_b + L_inter": (0.7, 0.3, 0.0), "KD L_b + L_adv": (0.7, 0.0, 0.2)}
    for name, lambdas in configurations.items():
        distiller = distillation.Distiller(keras.models.clone_model(student), teacher, lambdas, args.regressor_name)
        distiller.compile(optimizer=training.make_optimizer(plain_args, 1000), discriminator_optimizer=keras.optimizers.Adam(1e-4))
        variants[name] = (lambda d: lambda: d.train_on_batch(images, labels))(distiller)

    timings = {name: [] for name in variants}
    for step in range(args.warmup + args.steps):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            if step >= args.warmup:
                timings[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in timings.items()}
    reference = median["teacher forward"] + median["student step"]
    print(f"teacher {resnet.count_parameters(teacher):,} parameters ({args.teacher_path or f'random, width {args.width}'}), "
          f"student {resnet.count_parameters(student):,}, stage widths {resnet.describe_model(student)[0]['stages']}, "
          f"batch {args.batch_size}, median of {args.steps} steps")
    for name, value in median.items():
        print(f"{name:28s} {1e3 * value:8.1f} ms")
    print(f"{'teacher forward + student':28s} {1e3 * reference:8.1f} ms")
    for name in configurations:
        print(f"ratio {name}: {median[name] / reference:.2f}x (target <= 1.25x)")


if __name__ == "__main__":
    cli.run(main)
