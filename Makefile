# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := demo
DEMO_FLAGS := --dataset sample --batch_size 64

.PHONY: install demo test test-all figures figures-strong clean-demo

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps --editable .  # cnn_compression and the stage modules, importable anywhere
	touch $@

install: $(VENV)/.installed

# The quickstart: all five stages on the bundled real-CIFAR-10 sample, offline, a few minutes on
# 2 CPU cores. Outputs go to demo/, figures to images/demo/, and a results table ends the run.
DEMO_KD := --root_folder=$(DEMO)/model/pruned_model/iter3 --base_model_path=$(DEMO)/model/base_model/model.h5 \
	$(DEMO_FLAGS) --epoch_num 4 --student_learning_rate 0.05 --verbose 2
demo: install
	$(PY) train_base_model.py --save_folder=$(DEMO)/model/base_model $(DEMO_FLAGS) --width 0.125 --stem cifar --epoch_num 8 --learning_rate 0.05 --verbose 2
	$(PY) prune_model.py --root_folder=$(DEMO)/model/pruned_model --base_model_path=$(DEMO)/model/base_model/model.h5 \
		--prune_iter=3 $(DEMO_FLAGS) --epoch_num 2 --patience 1 --warmup_epochs 0 --verbose 2
	$(PY) knowledge_distillation.py $(DEMO_KD) --save_folder=$(DEMO)/model/kd_model/student_alone --no_teacher
	$(PY) knowledge_distillation.py $(DEMO_KD) --save_folder=$(DEMO)/model/kd_model/backbone --lambda1=0.7 --lambda2=0 --lambda3=0
	$(PY) knowledge_distillation.py $(DEMO_KD) --save_folder=$(DEMO)/model/kd_model/backbone_intermediate --lambda1=0.7 --lambda2=0.3 --lambda3=0 --regressor_name=vid
	$(PY) knowledge_distillation.py $(DEMO_KD) --save_folder=$(DEMO)/model/kd_model/all_three --lambda1=0.7 --lambda2=0.3 --lambda3=0.2 --regressor_name=vid
	$(PY) evaluate_model.py --model_path=$(DEMO)/model/kd_model/all_three/model.h5 --base_model_path=$(DEMO)/model/base_model/model.h5 \
		--dataset sample --latency_repeats 5
	$(PY) plot_train_history.py --history_path=$(DEMO)/model/pruned_model/iter1/history.json
	$(PY) plot_train_history.py --figures --model_root=$(DEMO)/model --images_dir=images/demo --table=$(DEMO)/results.md

# Figures and results table of the reference run (model/ -> images/, results.md).
figures: install
	$(PY) plot_train_history.py --figures --table results.md

# The strong reference run's (model/cifar_stem/, issue 22) figures and table, however far it has got.
figures-strong: install
	$(PY) plot_train_history.py --figures --model_root model/cifar_stem --images_dir images/cifar_stem --table model/cifar_stem/results.md

# The suite CI runs; test-all adds the slow multi-process repeats. Whole files per worker, longest
# first (tests/conftest.py orders them); the ten slowest tests listed, so every CI log shows where
# the suite's time goes.
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=10
test: install
	$(PYTEST) -m "not slow"

test-all: install
	$(PYTEST)

clean-demo:
	rm -rf $(DEMO) images/demo
