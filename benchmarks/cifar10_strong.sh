#!/usr/bin/env bash
# The strong reference run (issue 22): the CIFAR stem (3x3, no pool: the standard for 32x32 inputs)
# at width 0.25, trained from scratch on the 45,000-image split, into $ROOT (model/cifar_stem/).
#
# It spans sessions. Start or resume it with benchmarks/strong_run.sh (a worktree pinned at the
# commit recorded in model/cifar_stem/RUN_COMMIT, niced, logged); this file is what that worktree
# runs. Every stage resumes: rerunning skips finished epochs, iterations and stages. The resume
# state of an unfinished stage is Keras' BackupAndRestore folder (<stage>/backup/), committed with
# the run while the stage is unfinished.
#
# Stages so far: the base. Pruning (APoZ and Taylor to 3x) and the students follow once the base is
# done, each pinned at the commit it starts from.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA_DIR=${DATA_DIR:-../shared/data/cifar-10-batches-py}
ROOT=${ROOT:-./model/cifar_stem}

# Base recipe (standard for CIFAR ResNets, not tuned on test): SGD with Nesterov momentum at a peak
# learning rate 0.1 for batch 128, 2 warm-up epochs then cosine decay over 40 epochs, label
# smoothing 0.1, pad-4 crops and flips. Weight decay 5e-3 decoupled: Keras' SGD shrinks each weight
# by lr * wd per step, PyTorch's coupled 5e-4 (the recipe's source) by ~lr * 5e-4 / (1 - 0.9), ten
# times more; a short check on 10,000 images is in docs/base_training.md. float32 pinned: with
# --precision auto a session on an AMX machine would resolve to mixed_bfloat16, which is another
# run (refused on resume).
$PY train_base_model.py --save_folder=$ROOT/base_model --stem cifar --width 0.25 --epoch_num 40 \
    --learning_rate 0.1 --warmup_epochs 2 --weight_decay 5e-3 --label_smoothing 0.1 --batch_size 128 \
    --precision float32 --data_dir "$DATA_DIR" --verbose 2
