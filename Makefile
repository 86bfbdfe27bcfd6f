# The commands people type. Everything goes through .venv, created on demand.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint typecheck proto proto-check bench bench-wan bench-worker bench-tree compare plots reliability clean

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
	$(PY) -m bench.worker
	$(MAKE) bench-tree
	$(MAKE) bench-wan

# What a worker holds (docs/worker.md): LoRA site accounting, CPU modes, the full fine-tune's host
# side. On a CUDA machine, `$(PY) -m bench.worker --gpu` adds the GPU section.
bench-worker: setup
	$(PY) -m bench.worker

# One round of 64 sites, flat against a root with 4 intermediates (docs/scaling.md): the root's RSS,
# ingest and round time (about a minute on 2 cores).
bench-tree: setup
	$(PY) -m bench.tree

# The round on shaped links (bench/wan): sites and aggregator in network namespaces, tbf rates, a
# userspace delay line for the RTT. Needs root (ip netns, tc); ours, Flower and NVIDIA FLARE, K = 4.
bench-wan: setup
	$(PY) -m bench.wan.run

# Every method and codec on the demo task: docs/methods.md and its plots (about 15 minutes on 2 cores).
compare: plots
	$(PY) -m bench.compare --dir compare-run
	# FedCyBGD in its own regime (IID sites, N >= L blocks), in one process: docs/methods.md's second table.
	$(PY) -m bench.compare --cybgd-regime

# Faults injected into real daemons and sites (docs/reliability.md): writes docs/reliability.{md,json}
# and fails when a goal is missed (about 6 minutes on 2 cores; CI runs --quick in tests/test_reliability.py).
reliability: setup
	$(PY) -m bench.reliability.campaign

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis demo-run compare-run
