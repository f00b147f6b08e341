#!/usr/bin/env bash
# The strong reference run (issue 13): the CIFAR stem (3x3, no pool: the standard for 32x32 inputs)
# at width 0.25, trained from scratch on the 45,000-image split, into model/cifar_stem/.
#
#     bash benchmarks/cifar10_strong.sh > cifar10_strong.log 2>&1 &     # from the repository root
#
# Every stage resumes: rerun the same command after an interruption (a new session, a kill) and
# finished epochs, iterations and stages are skipped. The resume state of an unfinished stage is
# Keras' BackupAndRestore folder (<stage>/backup/), committed with the run while it is unfinished.
#
# Stages so far: the base. Pruning and the students follow once the base is done (see the README's
# results section for what is committed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA_DIR=${DATA_DIR:-../shared/data/cifar-10-batches-py}
ROOT=./model/cifar_stem

# Base recipe (standard for CIFAR ResNets, not tuned on this data beyond it): SGD with Nesterov
# momentum at a peak learning rate 0.1 for batch 128, 2 warm-up epochs then cosine decay over 40
# epochs, decoupled weight decay 5e-4, label smoothing 0.1; pad-4 crops and flips. float32 pinned:
# with --precision auto a later session on an AMX machine would resolve to mixed_bfloat16, which
# is another run (refused on resume).
$PY train_base_model.py --save_folder=$ROOT/base_model --stem cifar --width 0.25 --epoch_num 40 \
    --learning_rate 0.1 --warmup_epochs 2 --weight_decay 5e-4 --label_smoothing 0.1 --batch_size 128 \
    --precision float32 --data_dir "$DATA_DIR" --verbose 2
