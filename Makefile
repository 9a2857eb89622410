# Two commands set up a fresh machine: `make demo` and `make test`. Both are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch lies on disk; any other spec pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# ONNX input for the CLI; --no-deps keeps out torchvision, which breaks beside CPU torch.
	$(PY) -m pip install --quiet --no-deps onnx2torch
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lowbit demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest

# Each benchmark prints a table and writes benchmarks/results/<name>.json (see its docstring).
BENCHMARKS := efficientnet_lite0 onnx_runtime kernels efficientnet_algorithms minilm minilm_dynamic report

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	for b in $(BENCHMARKS); do $(PY) benchmarks/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
