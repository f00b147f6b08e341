#!/usr/bin/env bash
# The reference run on the full CIFAR-10 split (45,000 / 5,000 / 10,000), sized for about 2 hours
# on 2 CPU cores: base -> 15 pruning iterations -> four distillation variants -> evaluation -> figures.
#
#     bash benchmarks/cifar10_reference.sh          # from the repository root, after `make install`
#
# Every stage resumes: rerun the script after an interruption and finished work is skipped.
# Budget (chosen from measurements on 2 CPU cores: width 0.25 trains at ~1,200-1,700 images/s,
# full width at ~300): width 0.25, ImageNet stem (as the original), base 30 epochs; pruning
# 15 iterations of at most 4 fine-tuning epochs (patience 2); each student 15 epochs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# Stages compare their arguments on resume: keep this string the same across sittings.
DATA_DIR=${DATA_DIR:-../shared/data/cifar-10-batches-py}
# The committed run trained in float32, before --precision auto existed: pin it so a rerun resumes it on any CPU.
export PRECISION="--precision float32"
TEACHER=./model/pruned_model/iter15
# --student_divisor 8: the original's absolute student widths (8/16/32/64) from our width-0.25 base.
KD="--data_dir $DATA_DIR --precision float32 --epoch_num 15 --student_learning_rate 0.05 --student_divisor 8 --verbose 2"

$PY train_base_model.py --save_folder=./model/base_model --width 0.25 --epoch_num 30 --learning_rate 0.05 \
    --data_dir "$DATA_DIR" $PRECISION --verbose 2
$PY prune_model.py --prune_iter=15 --epoch_num 4 --patience 2 --warmup_epochs 0 --learning_rate 0.01 \
    --data_dir "$DATA_DIR" $PRECISION --verbose 2
# Residual streams pruned too: fewer iterations reach the same compression, and latency follows (README, "Speed").
$PY prune_model.py --root_folder ./model/pruned_residual --prune_residual --prune_iter=6 --epoch_num 4 --patience 2 \
    --warmup_epochs 0 --learning_rate 0.01 --data_dir "$DATA_DIR" $PRECISION --verbose 2
$PY knowledge_distillation.py --root_folder=$TEACHER --save_folder=./model/kd_model/student_alone --no_teacher $KD
$PY knowledge_distillation.py --root_folder=$TEACHER --save_folder=./model/kd_model/backbone \
    --lambda1=0.7 --lambda2=0 --lambda3=0 $KD
# vid: the conv1x1 regressor's plain MSE is swamped by rare huge teacher activations (see README).
$PY knowledge_distillation.py --root_folder=$TEACHER --save_folder=./model/kd_model/backbone_intermediate \
    --lambda1=0.7 --lambda2=0.3 --lambda3=0 --regressor_name=vid $KD
$PY knowledge_distillation.py --root_folder=$TEACHER --save_folder=./model/kd_model/all_three \
    --lambda1=0.7 --lambda2=0.3 --lambda3=0.2 --regressor_name=vid $KD
for model in ./model/base_model ./model/pruned_model/iter5 ./model/pruned_model/iter10 $TEACHER \
             ./model/pruned_residual/iter3 ./model/pruned_residual/iter6 \
             ./model/kd_model/student_alone ./model/kd_model/backbone ./model/kd_model/backbone_intermediate \
             ./model/kd_model/all_three; do
    $PY evaluate_model.py --model_path=$model/model.h5 --data_dir "$DATA_DIR" --json $model/evaluation.json
done
$PY plot_train_history.py --figures --table results.md
