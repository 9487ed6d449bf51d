# glint developer entry points. `make serve` and `make test` set everything up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.glint-installed
# The CPU build of torch (pip takes 2.13.0 from local disk on our machines); a GPU machine keeps its own torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup serve test test-gpu

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# Serve the built-in tiny GLM-4.7-format model (written on first use) with the OpenAI API on 127.0.0.1:8000.
serve: setup
	$(BIN)/python -m server $(ARGS)

# The CPU test suite (what CI runs).
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# GPU tests, on a machine with CUDA (run through the device tool).
test-gpu:
	python3 -m pytest -m gpu $(PYTEST_ARGS)
