#!/usr/bin/env bash
# Importance-criterion ablation: one pruning run per criterion (apoz, l1, bn_scale, taylor, random),
# each to --target_compression 3 with the fraction rule, the same step and the same fine-tuning
# budget, inner channels only, from the same base, into $OUT/<importance>; then the comparison
# figure and table (benchmarks/pruning_ablation.py). Hours on 2 CPU cores: not run by the tests.
#
#     bash benchmarks/pruning_ablation.sh                        # from the repository root, after `make install`
#     BASE=./model/base_model/model.h5 OUT=./model/ablation STEP=0.2 bash benchmarks/pruning_ablation.sh
#     DRY_RUN=1 bash benchmarks/pruning_ablation.sh              # print the commands only
#     bash benchmarks/pruning_ablation.sh --ranking global       # extra flags go to every prune_model.py run
#
# With --ranking layer (the default) and the fraction rule, every criterion removes the same number
# of channels from each layer in each iteration: the runs have the same architectures, iteration by
# iteration, and differ only in WHICH channels go. Every run resumes when rerun (keep the same
# variables and flags across sittings).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BASE=${BASE:-./model/base_model/model.h5}
DATA_DIR=${DATA_DIR:-../shared/data/cifar-10-batches-py}
OUT=${OUT:-./model/ablation}
STEP=${STEP:-0.2}       # width 0.25 base, inner channels: 1.33x, 1.72x, 2.15x, 2.64x, then 3x (the last step cut)
TARGET=${TARGET:-3}
RUN=${DRY_RUN:+echo}
# The reference run's fine-tuning budget per iteration (benchmarks/cifar10_reference.sh).
COMMON=(--base_model_path "$BASE" --data_dir "$DATA_DIR" --target_compression "$TARGET" --criterion fraction
        --prune_fraction "$STEP" --prune_iter 20 --epoch_num 4 --patience 2 --warmup_epochs 0 --learning_rate 0.01
        --seed 0 --verbose 2)

for importance in apoz l1 bn_scale taylor random; do
    $RUN "$PY" prune_model.py --root_folder "$OUT/$importance" --importance "$importance" "${COMMON[@]}" "$@"
done
$RUN "$PY" benchmarks/pruning_ablation.py --ablation_root "$OUT" --figure "$OUT/ablation.png" --table "$OUT/ablation.md"
