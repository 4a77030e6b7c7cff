# One-command set-up: every target creates .venv when missing and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch and torchvision are pinned to the wheels that lie on this kind of machine's disk.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
CONFIG ?= offline
RUN    ?=

.PHONY: install demo test bench clean-data help

help:
	@echo "make demo   - install, run the whole pipeline on configs/$(CONFIG).yaml, print the results folder"
	@echo "make test   - install, run unit tests and every notebook under nbval"
	@echo "make bench  - install, print activation-caching and similarity-function speed and memory"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@$(PY) -m nd_utils run $(CONFIG)

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_activations.py
	$(PY) benchmarks/bench_similarity.py

clean-data:
	rm -rf data/artifacts data/runs
