# pkmlm — the two set-up commands are `make setup` and `make train`; tests are `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch: a CPU build on a machine without an NVIDIA GPU (2.13.0 is on local disk here, seconds to
# install), the default (CUDA) PyPI build where nvidia-smi answers. Override either way, e.g.
#   make setup TORCH_SPEC='torch==2.13.0' TORCH_INDEX=https://download.pytorch.org/whl/cu128
HAS_GPU     := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC  ?= $(if $(HAS_GPU),torch,torch==2.13.0)
TORCH_INDEX ?=
PIP_TORCH_INDEX := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
# triton: with a CUDA torch, the one torch pins (its kernels run natively); with the CPU torch, one
# for the kernel tests, which run under triton's interpreter (3.7.1, 3.8.0 and 3.9.0 pass with
# torch 2.13 CPU; 3.5.1 and 3.6.0 fail two interpreter tests). Empty: none.
TRITON_SPEC ?= $(if $(HAS_GPU),,triton>=3.7)

.PHONY: setup train test test-fast lint bench bench-data faults results clean help
help:
	@echo "make setup   create $(VENV) and install pkmlm (+dev, +hf: transformers) and torch"
	@echo "make train   train the default experiment (model=tiny on the Wikipedia sample)"
	@echo "make test    ruff (lint + format check), then the test suite on CPU: tests/unit and tests/e2e"
	@echo "make test-fast  ruff, then tests/unit only (no training run; under 2 minutes)"
	@echo "make bench   memory layer, model and generation (KV cache) speed tables (paper sizes on CUDA, CPU-sized otherwise)"
	@echo "make bench-data  data pipeline tokens/s: bare encoding vs streaming vs prepared shards"
	@echo "make faults  the long fault-injection run: 100 kill -9s, stop signals, a full disk (docs/reliability.md)"
	@echo "make results  re-render the measured tables of README.md and docs/benchmarks.md from docs/results/*.json"

setup: $(BIN)/pkmlm-train
$(BIN)/pkmlm-train: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q '$(TORCH_SPEC)' $(PIP_TORCH_INDEX)
	$(BIN)/python -m pip install -q -e '.[dev,hf]' $(if $(TRITON_SPEC),'$(TRITON_SPEC)',)
	@touch $@
	@$(BIN)/python -c "import torch, pkmlm; print('pkmlm ready: torch', torch.__version__, '| cuda', torch.cuda.is_available())"

train: setup
	$(BIN)/pkmlm-train

test: setup lint   # tests/unit (fast, no training run) and tests/e2e (training runs, CLIs in subprocesses)
	$(BIN)/python -m pytest tests --durations=15  # the slowest 15 listed: make test must stay under 15 min here

test-fast: setup lint   # tests/unit alone: the quick check while editing
	$(BIN)/python -m pytest tests/unit

lint: setup   # mechanical style: ruff's lint rules and formatter, settings in pyproject.toml
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

bench: setup   # memory layer vs FFN, dense vs memory models, Engram vs FFN, generation with/without KV cache: docs/benchmarks.md (CPU ~6 min)
	$(BIN)/python scripts/bench_memory.py
	$(BIN)/python scripts/bench_model.py
	$(BIN)/python scripts/bench_step.py
	$(BIN)/python scripts/bench_engram.py
	$(BIN)/python scripts/bench_generate.py

bench-data: setup   # data pipeline tokens/s: bare encode_batch vs streaming vs prepared shards (~2 min)
	$(BIN)/python scripts/bench_data.py

faults: setup   # kill -9 / signals / full disk / damaged checkpoints, each resumed and compared (~2 min)
	$(BIN)/python scripts/fault_inject.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache

results: setup   # re-render README.md's and docs/benchmarks.md's measured tables from docs/results/*.json
	$(BIN)/python -m pkmlm.results
