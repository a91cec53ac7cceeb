# The README's two commands are `make demo` and `make test`; both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install install-test demo test test-all lint docs bench gpu-prep

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -e ".[demo]"

install-test: $(BIN)/python
	$(BIN)/pip install -e ".[test]"

demo: install
	$(BIN)/python examples/train.py

test: install-test
	$(BIN)/python -m pytest -q -n 2

test-all: install-test
	$(BIN)/python -m pytest -q -n 2 -m "slow or not slow"

lint: install-test
	$(BIN)/ruff check .

docs: $(BIN)/python
	$(BIN)/pip install -e ".[docs,test]"
	$(BIN)/sphinx-build -W -b html docs docs/_build/html

bench: install-test
	$(BIN)/python benchmarks/compare_smp.py

# What benchmarks/gpu_check.sh needs on a GPU machine without a package index (see that script).
gpu-prep: install-test
	$(BIN)/pip wheel -q --no-deps -w .whl efficientnet-pytorch==0.7.1 pretrainedmodels==0.7.4 munch
	test -f .bench/smp06-pkg/segmentation_models_pytorch/__init__.py || \
	  $(BIN)/pip install -q --no-deps --target .bench/smp06-pkg segmentation-models-pytorch==0.6.0
