# rlrun: `make run` runs the default experiment, `make test` runs the test suite.
# Both create .venv on first use (python3 -m venv + pip; see README for why not uv/poetry).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: run test bench mlflow-ui tensorboard clean-outputs

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
BENCHES ?= startup overlap trl_compare scaling tracker tracker_load default_quality environments doctor servers
bench: $(VENV)/.installed-bench
	@set -e; for b in $(BENCHES); do echo "== benchmarks/$$b.py"; $(PY) benchmarks/$$b.py $(ARGS); done

mlflow-ui: $(VENV)/.installed
	$(PY) -m mlflow ui --backend-store-uri sqlite:///$(CURDIR)/outputs/mlflow.db \
	  --default-artifact-root $(CURDIR)/outputs/mlartifacts --host 127.0.0.1 --port 5000

tensorboard: $(VENV)/.installed
	$(VENV)/bin/tensorboard --logdir outputs --host 127.0.0.1 --port 6006

clean-outputs:
	rm -rf outputs/*
