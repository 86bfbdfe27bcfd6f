# The commands people type. Everything goes through .venv, created on demand.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint typecheck proto proto-check bench compare plots clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: the pinned CPU build, so the project's range below never pulls a CUDA one.
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# Compile the codec's numba kernels now (cached next to the module), not in the first daemon.
	$(PY) -c "import common.codec.shuffle"
	touch $(STAMP)

demo: setup
	$(PY) -m common.cli demo run demo-run

test: setup lint
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

proto: setup
	$(PY) -m common.protogen

proto-check: setup
	$(PY) -m common.protogen --check

# matplotlib draws the PNG plots of bench and compare: an extra, never a runtime dependency.
plots: setup
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install --quiet -e ".[dev,plots]"

# Flower and NVIDIA FLARE get venvs of their own (bench/.venv-flower, bench/.venv-nvflare), made by
# bench.compare_peers on first use.
bench: plots
	$(PY) -m bench.codec
	$(PY) -m bench.aggregator
	$(PY) -m bench.limits
	$(PY) -m bench.compare_peers

# Every method and codec on the demo task: docs/methods.md and its plots (about 15 minutes on 2 cores).
compare: plots
	$(PY) -m bench.compare --dir compare-run
	# FedCyBGD in its own regime (IID sites, N >= L blocks), in one process: docs/methods.md's second table.
	$(PY) -m bench.compare --cybgd-regime

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis demo-run compare-run
