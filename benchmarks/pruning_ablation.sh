#!/usr/bin/env bash
# Importance-criterion ablation: one pruning run per criterion (apoz, l1, bn_scale, taylor, random),
# each to --target_compression 3 with the fraction rule, the same step and the same fine-tuning
# budget (EPOCHS per iteration, no early stop), from the same base: inner channels into
# $OUT/inner/<importance>, then inner + residual channels (--prune_residual) into
# $OUT/residual/<importance>; then the comparison figure and table of each
# (benchmarks/pruning_ablation.py). Hours on 2 CPU cores: not run by the tests.
#
#     bash benchmarks/pruning_ablation.sh                        # from the repository root, after `make install`
#     BASE=./model/base_model/model.h5 OUT=./model/ablation STEP=0.2 EPOCHS=2 bash benchmarks/pruning_ablation.sh
#     DRY_RUN=1 bash benchmarks/pruning_ablation.sh              # print the commands only
#     bash benchmarks/pruning_ablation.sh --ranking global       # extra flags go to every prune_model.py run
#     SEEDS="0 1" CHANNELS=residual bash benchmarks/pruning_ablation.sh   # a second seed of every run
#     CRITERIA="taylor random" bash benchmarks/pruning_ablation.sh        # some criteria only
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
EPOCHS=${EPOCHS:-2}     # fine-tuning epochs of every iteration; patience = EPOCHS, so every run gets the same budget
CHANNELS=${CHANNELS:-inner residual}
CRITERIA=${CRITERIA:-apoz l1 bn_scale taylor random}
SEEDS=${SEEDS:-0}       # seed 0 runs into <importance>, seed S > 0 into <importance>_seed<S>; the table averages seeds
RUN=${DRY_RUN:+echo}
# The reference run's learning rate (benchmarks/cifar10_reference.sh), a fixed number of epochs.
COMMON=(--base_model_path "$BASE" --data_dir "$DATA_DIR" --target_compression "$TARGET" --criterion fraction
        --prune_fraction "$STEP" --prune_iter 20 --epoch_num "$EPOCHS" --patience "$EPOCHS" --warmup_epochs 0
        --learning_rate 0.01 --precision float32 --verbose 2)

for channels in $CHANNELS; do
    extra=()
    [ "$channels" = residual ] && extra=(--prune_residual)
    for seed in $SEEDS; do
        for importance in $CRITERIA; do
            folder="$OUT/$channels/$importance"
            [ "$seed" = 0 ] || folder="${folder}_seed$seed"
            $RUN "$PY" prune_model.py --root_folder "$folder" --importance "$importance" --seed "$seed" \
                "${COMMON[@]}" "${extra[@]}" "$@"
        done
    done
    $RUN "$PY" benchmarks/pruning_ablation.py --ablation_root "$OUT/$channels" --figure "$OUT/$channels/ablation.png" \
        --table "$OUT/$channels/ablation.md"
done
