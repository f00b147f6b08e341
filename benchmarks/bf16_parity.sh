#!/usr/bin/env bash
# bfloat16 parity (issue 11's target: within 1 point of float32): the base stage twice, same seed,
# data and recipe, once in float32 and once in mixed_bfloat16, then both test accuracies. Meaningful
# only where the CPU computes bfloat16 natively (AMX / AVX512-BF16); elsewhere it is emulated and slow.
#
#     bash benchmarks/bf16_parity.sh          # OUT=./model/bf16_parity EPOCHS=6 TRAIN_SIZE=10000
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA_DIR=${DATA_DIR:-../shared/data/cifar-10-batches-py}
OUT=${OUT:-./model/bf16_parity}
EPOCHS=${EPOCHS:-6}
TRAIN_SIZE=${TRAIN_SIZE:-10000}
for precision in float32 mixed_bfloat16; do
    "$PY" train_base_model.py --save_folder "$OUT/$precision" --precision "$precision" --stem cifar --width 0.25 \
        --train_size "$TRAIN_SIZE" --epoch_num "$EPOCHS" --learning_rate 0.1 --warmup_epochs 1 --label_smoothing 0.1 \
        --weight_decay 5e-3 --batch_size 128 --seed 0 --data_dir "$DATA_DIR" --verbose 2
done
"$PY" - "$OUT" <<'PYTHON'
import json, os, sys
accuracy = {}
for precision in ("float32", "mixed_bfloat16"):
    with open(os.path.join(sys.argv[1], precision, "config.json")) as handle:
        config = json.load(handle)
    accuracy[precision] = 100 * config["results"]["test_acc"]
    print(f"{precision}: test {accuracy[precision]:.2f}% (validation {100 * config['results']['best_val_acc']:.2f}%, "
          f"best epoch {config['results']['best_epoch']}; CPU {config['versions'].get('cpu')})")
gap = accuracy["mixed_bfloat16"] - accuracy["float32"]
print(f"bfloat16 - float32: {gap:+.2f} points ({'within' if abs(gap) <= 1 else 'NOT within'} 1 point)")
PYTHON
