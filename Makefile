# The two commands of the README: `make train` (main job on the embedded default corpus) and `make test` (the
# whole suite, what .ci/run runs); `make test-fast` is the quick tier (tests not marked slow).
# Each creates .venv on first use. TORCH pins the CPU wheel for the CPU path; GPU users run
# `make install TORCH=torch` (or `pip install -e .` into an env that already has CUDA torch).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install train test test-fast bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,serve]"
	touch $@

install: $(BIN)/.installed

train: install
	$(BIN)/raymoe train --config cluster_configs/local_tiny.yaml

test: install
	$(BIN)/python -m pytest -q --durations=15 tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: install
	$(BIN)/python benchmarks/moe_layer.py

clean:
	rm -rf runs .cache
