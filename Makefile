# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := demo
DEMO_FLAGS := --dataset sample --width 0.125 --batch_size 64

.PHONY: install demo test clean-demo

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	touch $@

install: $(VENV)/.installed

# The quickstart: every stage on the bundled real-CIFAR-10 sample, offline, a few minutes on 2 CPU cores.
demo: install
	$(PY) train_base_model.py --save_folder=$(DEMO)/model/base_model $(DEMO_FLAGS) --stem cifar --epoch_num 8 --learning_rate 0.05 --verbose 2
	$(PY) evaluate_model.py --model_path=$(DEMO)/model/base_model/model.h5 --base_model_path=$(DEMO)/model/base_model/model.h5 --dataset sample --json $(DEMO)/model/base_model/evaluation.json

test: install
	$(PY) -m pytest -q

clean-demo:
	rm -rf $(DEMO)
