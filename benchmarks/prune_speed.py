"""Time the pruning primitives: the APoZ pass against a predict pass, and weight surgery.

    .venv/bin/python benchmarks/prune_speed.py --data_dir /work/shared/data/cifar-10-batches-py

Both passes run over the same (cached) validation images with the same batch size, each timed
once with its function already traced and once including its tracing (as for every new pruned
model); repeats are interleaved and the best of --repeats is reported for each, so the load of
other processes hits all of them alike. Surgery is timed on a full-width ResNet50 keeping a
random half of the channels of every group (inner only, then inner and residual).
"""

import time


from cnn_compression import checkpoints  # noqa: E402
from cnn_compression import cli  # noqa: E402


def best_time(function, repeats):
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return min(timings)


def main(argv=None):
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", default=None, help="a model to measure (default: a fresh --width ResNet50)")
    parser.add_argument("--width", type=cli.positive_float, default=1.0)
    parser.add_argument("--images", type=cli.positive_int, default=2000, help="validation images per pass")
    parser.add_argument("--repeats", type=cli.positive_int, default=5)
    cli.add_data_flags(parser)
    args = parser.parse_args(argv)
    import numpy as np

    from cnn_compression import data
    import model as resnet
    from cnn_compression import channel_importance
    import prune

    network = checkpoints.load_model(args.model_path) if args.model_path else resnet.build_resnet50(resnet.width_spec(args.width))
    split = data.load_split(args.dataset, args.data_dir, None, args.seed)
    images = split.x_val[: args.images]
    dataset = data.make_dataset(images, split.y_val[: args.images], args.batch_size).map(lambda x, y: x).cache()
    for batch in dataset:  # fill the cache so neither pass pays for the input pipeline's first run
        pass
    print(f"model: {resnet.count_parameters(network):,} parameters; {len(images)} images, batch {args.batch_size}")

    def predict_cold():
        network.predict_function = None  # Keras traces it again, as for each new pruned model
        network.predict(dataset, verbose=0)

    network.predict(dataset.take(1), verbose=0)  # warm-up: trace
    passes = {"predict, traced already": lambda: network.predict(dataset, verbose=0),
              "predict, including its tracing": predict_cold}
    for residual in (False, True):
        groups = prune.any_model_groups(network, residual, ignored_layers=["conv1_conv"])  # the stage's defaults
        names = [entry["layer"] for group in groups for entry in group["activations"]]
        label = f"apoz {'inner+residual' if residual else 'inner'} ({len(names)} layers)"
        count = channel_importance.zero_counter(network, names)
        channel_importance.apoz(network, names, dataset.take(1), verbose=0, count=count)  # trace
        passes[f"{label}, traced already"] = lambda names=names, count=count: channel_importance.apoz(
            network, names, dataset, verbose=0, count=count)
        passes[f"{label}, including its tracing"] = lambda names=names: channel_importance.apoz(network, names, dataset, verbose=0)
    # Interleaved repeats, best of each: load from other processes then hits every pass alike.
    timings = {name: [] for name in passes}
    for _ in range(args.repeats):
        for name, function in passes.items():
            timings[name].append(best_time(function, 1))
    results = {name: min(values) for name, values in timings.items()}
    for name, seconds in results.items():
        reference = results["predict, " + name.split(", ")[-1]]
        ratio = "" if name.startswith("predict") else f"  {seconds / reference:.2f}x predict"
        print(f"{name:<52} {seconds:7.2f} s{ratio}")

    full_width = resnet.width_spec(1.0)
    full = network if resnet.describe_model(network)[0] == full_width else resnet.build_resnet50(full_width)
    rng = np.random.default_rng(0)
    for residual in (False, True):
        groups = prune.any_model_groups(full, residual, ignored_layers=["conv1_conv"])
        keep = {group["name"]: rng.choice(group["width"], max(1, group["width"] // 2), replace=False) for group in groups}
        start = time.perf_counter()
        smaller = prune.prune_groups(full, groups, keep)
        seconds = time.perf_counter() - start
        print(f"surgery, {'inner+residual' if residual else 'inner'} halved, {resnet.count_parameters(full):,} -> "
              f"{resnet.count_parameters(smaller):,} parameters: {seconds:.2f} s")


if __name__ == "__main__":
    cli.run(main)
