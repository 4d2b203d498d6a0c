# rlrun: `make run` runs the default experiment, `make test` runs the test suite.
# Both create .venv on first use (python3 -m venv + pip; see README for why not uv/poetry).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: run test bench gpu-wheels mlflow-ui tensorboard clean-outputs

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[dev]'
	touch $(VENV)/.installed $@

run: $(VENV)/.installed
	$(PY) -m rlrun $(ARGS)

test: $(VENV)/.installed-dev
	$(PY) -m pytest $(ARGS)

$(VENV)/.installed-bench: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[bench,envs,trackers]'
	touch $(VENV)/.installed $@

# Every benchmark in turn (or some: make bench BENCHES="overlap startup"); ARGS go to each.
# Each prints a table and writes benchmarks/results/<name>.json (see README: Benchmarks).
BENCHES ?= startup overlap bare_loop trl_compare scaling tracker tracker_load default_quality environments doctor servers soak
bench: $(VENV)/.installed-bench
	@set -e; for b in $(BENCHES); do echo "== benchmarks/$$b.py"; $(PY) benchmarks/$$b.py $(ARGS); done

# Wheels for scripts/gpu_check.sh on a GPU machine without network (Python 3.12, x86-64): what
# rlrun's console / jsonl / TensorBoard path imports and that machine's image lacks (its torch,
# transformers, tensorboard, nvidia-ml-py, psutil, rich, PyYAML and pytest are used as they are).
# Pinned to this project's tested versions; antlr4's runtime has only an sdist on PyPI, so its
# (pure-Python) wheel is built here. Into .whl/ (ignored by git), carried with the working tree.
GPU_WHEELS      ?= hydra-core==1.3.8 omegaconf==2.3.1 loguru==0.7.3 setproctitle==1.3.8
GPU_WHEELS_SDIST ?= antlr4-python3-runtime==4.9.3
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_WHEELS)
	$(PYTHON) -m pip wheel -q --no-deps -w .whl $(GPU_WHEELS_SDIST)
	@ls -l .whl && du -sh .whl

mlflow-ui: $(VENV)/.installed
	$(PY) -m mlflow ui --backend-store-uri sqlite:///$(CURDIR)/outputs/mlflow.db \
	  --default-artifact-root $(CURDIR)/outputs/mlartifacts --host 127.0.0.1 --port 5000

tensorboard: $(VENV)/.installed
	$(VENV)/bin/tensorboard --logdir outputs --host 127.0.0.1 --port 6006

clean-outputs:
	rm -rf outputs/*
