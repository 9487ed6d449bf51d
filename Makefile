# glint developer entry points. `make serve` and `make test` set everything up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.glint-installed
# The CPU build of torch (pip takes 2.13.0 from local disk on our machines); a GPU machine keeps its own torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup kernel-libs clients serve test test-gpu

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# The CuTe-DSL kernel libraries of the `fa4` extra (FlashAttention-4 with the CUTLASS DSL and quack-kernels, which
# it imports): they import without a GPU, so the CPU tests run beside the real packages (the FA4 tests fake or hide
# the library either way).
KERNEL_LIBS_STAMP := $(VENV)/.glint-kernel-libs
$(KERNEL_LIBS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,fa4]"
	touch $@

kernel-libs: $(KERNEL_LIBS_STAMP)

# The agentic clients the server tests drive (tests/server/test_server_clients.py), in the ignored .tools/:
# Claude Code and the Codex CLI from npm (Node from the system package manager where missing), and the sglang
# wheel's bench_serving.py (files only: its GPU runtime is not needed to benchmark a server).
TOOLS := .tools
CLAUDE_CODE_VERSION ?= 2.1.197
CODEX_VERSION ?= 0.171.0
SGLANG_VERSION ?= 0.5.23
CLIENTS_STAMP := $(TOOLS)/.installed-$(CLAUDE_CODE_VERSION)-$(CODEX_VERSION)-$(SGLANG_VERSION)

$(CLIENTS_STAMP): | $(STAMP)
	command -v npm >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm)
	mkdir -p $(TOOLS)/node
	npm install --prefix $(TOOLS)/node --no-audit --no-fund --loglevel=error \
		@anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION) @openai/codex@$(CODEX_VERSION)
	rm -rf $(TOOLS)/sglang
	$(BIN)/python -m pip install -q --no-deps --target $(TOOLS)/sglang sglang==$(SGLANG_VERSION)
	touch $@

clients: $(CLIENTS_STAMP)

# Serve the built-in tiny GLM-4.7-format model (written on first use) with the OpenAI API on 127.0.0.1:8000.
serve: setup
	$(BIN)/python -m server $(ARGS)

# The CPU test suite (what CI runs).
test: setup kernel-libs clients
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# GPU tests, on a machine with CUDA (run through the device tool).
test-gpu:
	python3 -m pytest -m gpu $(PYTEST_ARGS)
