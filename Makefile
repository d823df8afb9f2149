# One command to set up and run the demo, one to run the tests. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench

$(BIN)/medmamba-edge: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	# CPU PyTorch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/medmamba-edge

demo: setup
	$(BIN)/medmamba-edge demo --workdir out/demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_cpu_latency.py
