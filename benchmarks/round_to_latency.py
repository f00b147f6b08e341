"""How much do channel counts below the CPU's vector width cost? TFLite float32 latency at batch 128
of compressed models against the same architectures with every width rounded up to 8 and 16.

    python benchmarks/round_to_latency.py

Only the architecture matters here (weights are fresh); the base and all models are timed in
alternating rounds. See README, "Speed, measured".
"""

import math
import os
import statistics


from cnn_compression import checkpoints  # noqa: E402
import cnn_compression  # noqa: E402
from cnn_compression import cli  # noqa: E402

MODELS = ("./model/pruned_model/iter15", "./model/pruned_residual/iter6", "./model/kd_model/all_three")


def rounded_spec(spec, multiple):
    """`spec` with every width rounded up to a multiple of `multiple` (as --round_to rounds the pruned widths)."""
    import model as resnet

    return resnet.map_widths(spec, lambda width: int(math.ceil(width / multiple) * multiple))


def main():
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_model_path", default="./model/base_model/model.h5")
    parser.add_argument("--models", nargs="*", default=list(MODELS), help="folders holding compressed model.h5 files")
    parser.add_argument("--rounds", type=cli.positive_int, default=3)
    args = parser.parse_args()
    cnn_compression.setup()  # TensorFlow quietly, and the fused BatchNorm the stages run
    from cnn_compression import tflite
    import model as resnet

    base = checkpoints.load_model(args.base_model_path, "base model")
    networks = {"base": base}
    for folder in args.models:
        network = checkpoints.load_model(os.path.join(folder, "model.h5"))
        spec = resnet.describe_model(network)[0]
        networks[folder] = network
        for multiple in (8, 16):
            networks[f"{folder}, widths rounded up to {multiple}"] = resnet.rebuild_like(network, rounded_spec(spec, multiple))
    flatbuffers = {name: tflite.float_tflite(network) for name, network in networks.items()}
    timings = {name: [] for name in networks}
    for _ in range(args.rounds):
        for name in networks:
            timings[name].append(tflite.tflite_latency(flatbuffers[name], 128, repeats=5, warmup=1))
    base_seconds, base_macs = statistics.median(timings["base"]), resnet.count_macs(base)[1]
    print(f"{'model':58s} {'MAC ratio':>9s} {'b128 ms':>8s} {'speed-up':>8s} {'/MACs':>5s}")
    for name, network in networks.items():
        seconds = statistics.median(timings[name])
        mac_ratio = base_macs / resnet.count_macs(network)[1]
        speedup = base_seconds / seconds
        print(f"{name:58s} {mac_ratio:8.2f}x {1e3 * seconds:8.2f} {speedup:7.2f}x {speedup / mac_ratio:5.2f}")


if __name__ == "__main__":
    cli.run(main)
