# One command to set up and run the demo, one to run the tests. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup serve-setup demo test bench

$(BIN)/medmamba-edge: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	# CPU PyTorch first, from PyTorch's CPU index: PyPI's Linux torch is the multi-GB CUDA build, which the extras'
	# bare `torch` requirement would pull too (TORCH_INDEX=... make setup for another build). Only torch itself
	# comes from there, its dependencies from the usual index: where that host cannot be reached, pip retries each
	# package it asks it for (76 s for torch and its ten, 9 s for torch alone) before the wheels it is configured with.
	$(BIN)/pip install --quiet --no-deps torch==2.13.0 --index-url $(TORCH_INDEX)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/medmamba-edge

# `serve` (PyTriton) pins numpy < 2; the dev venv keeps numpy 2. So a second venv: the runtime and the serve
# extra only, no torch (what it serves is torch-free). The Triton tests start `medmamba-edge serve` from it and skip without it.
SERVE_VENV := .venv-serve
# A PYTHON of 3.13 or later is refused in a line: pip would spend minutes on numpy 1.26's sdist, then fail.
SERVE_REFUSAL := serve-setup: the serve venv needs Python 3.10 to 3.12 (PyTriton pins numpy < 2, which has no wheels \
for Python %d.%d): make serve-setup PYTHON=python3.12 first (docs/serving.md)
$(SERVE_VENV)/bin/medmamba-edge: pyproject.toml setup.py
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info >= (3, 13) and "$(SERVE_REFUSAL)" % sys.version_info[:2])'
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install --quiet -e ".[serve]"
	touch $@

serve-setup: $(SERVE_VENV)/bin/medmamba-edge

demo: setup
	$(BIN)/medmamba-edge demo --workdir out/demo

test: setup serve-setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_cpu_latency.py
