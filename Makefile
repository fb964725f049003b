# megabatch developer commands. `make help` lists the targets.
#
# Everything runs from the project's own virtual environment (.venv), which the stamp
# target below creates and fills from pyproject.toml, pinned by constraints.txt.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Touched after a successful install; rebuilt when the dependency files change.
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install test demo compare lint check-coexistence format clean bench-kernels bench-data bench-train bench-metrics gpu-check gpu-test gpu-bench

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e '.[dev]'
	touch $@

install: $(STAMP) ## Create .venv and install megabatch (editable) with the dev tools

test: $(STAMP) ## Lint, check formatting and the import contracts, then run the test suite on 2 workers (the CI command)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/pytest -n 2

demo: $(STAMP) ## The main job on the built-in data: digits shards, tiny CLIP on 2 CPU ranks, evaluation
	$(BIN)/megabatch demo

compare: $(STAMP) ## Train every method on the digits with one backbone and budget; probe, kNN, zero-shot vs raw pixels and a random backbone -> docs/methods.md (3-5 min a method)
	test -f data/digits/train/manifest.json || $(BIN)/megabatch data write --from demo --out data/digits
	test -f data/digits/tokenizer.json || $(BIN)/megabatch data tokenizer data/digits/train --out data/digits/tokenizer.json --vocab-size 1000
	$(BIN)/megabatch compare $(COMPARE_ARGS)

lint: $(STAMP) ## Run ruff's linter and check the import contracts (.importlinter)
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

check-coexistence: ## Install megabatch beside PyPI's kernels and trainer in a fresh venv; they keep working and the demo runs (needs PyPI, ~5 min)
	.ci/check-coexistence

format: $(STAMP) ## Reformat the code and apply ruff's safe fixes
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean: ## Remove build and cache artefacts (keeps .venv; rm -rf .venv to start over)
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

# --- Kernel targets -------------------------------------------------------------------
# The GPU machine has torch and triton but no venv of ours (nor deepspeed/webdataset) and
# no network: gpu-check runs with a plain interpreter, GPU_PYTHON, from the repository
# root, and installs nothing. `megabatch.kernels` is made importable by a symlink,
# build/gpu-path/megabatch/kernels -> kernels/, with build/gpu-path on PYTHONPATH
# (`megabatch` is a namespace package, so the folder needs no __init__.py). A
# `pip install -e .` there would need setuptools>=69 in the image, which nobody promises.
GPU_PYTHON ?= python3
GPU_PATH   := build/gpu-path
GPU_ENV    := PYTHONPATH=$(CURDIR)/$(GPU_PATH)$${PYTHONPATH:+:$$PYTHONPATH}
# Compiling the Triton variants dominates the GPU tests: spread them over 4 workers
# where pytest-xdist is installed.
GPU_PYTEST_WORKERS = $(shell $(GPU_PYTHON) -c 'import xdist' 2>/dev/null && printf -- '-n 4')

bench-kernels: $(STAMP) ## CPU kernel benchmark: prints the table, writes docs/benchmarks.md
	$(BIN)/python -m megabatch.kernels.benchmark --device cpu --losses clip,ntxent,siglip,margin

bench-data: $(STAMP) ## Input pipeline benchmark (demo shards): prints the table, writes docs/benchmarks-data.md
	$(BIN)/python -m megabatch.data_pipeline.benchmark

bench-train: $(STAMP) ## One CLIP step at global batch 65,536 on 2 CPU ranks: time and peak memory per rank
	test -f data/digits/train/manifest.json || $(BIN)/megabatch data write --from demo --out data/digits
	test -f data/digits/tokenizer.json || $(BIN)/megabatch data tokenizer data/digits/train --out data/digits/tokenizer.json --vocab-size 1000
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(BIN)/python -m torch.distributed.run --standalone --nproc_per_node=2 -m megabatch.trainer.bench_train

bench-metrics: $(STAMP) ## Prometheus metrics' cost per step: sink, scrape, demo runs off vs on -> docs/benchmarks-monitoring.md
	test -f data/digits/train/manifest.json || $(BIN)/megabatch data write --from demo --out data/digits
	test -f data/digits/tokenizer.json || $(BIN)/megabatch data tokenizer data/digits/train --out data/digits/tokenizer.json --vocab-size 1000
	$(BIN)/python -m megabatch.trainer.bench_metrics

# Device time is scarce: every step runs even when one before it failed, and the exit
# status is the first failure's. The per-pass benchmark ends with the experimental TMA
# backward; `timeout` bounds it in case that kernel hangs (its tables are written first).
# gpu-test and gpu-bench are the two halves of gpu-check, for a session that must split
# it across two device calls (one call may run at most 10 minutes).
RUN_ALL_STEPS = status=0; step() { "$$@" || { rc=$$?; [ $$status -ne 0 ] || status=$$rc; }; }

gpu-check: ## On a CUDA machine: gpu-test, then gpu-bench
	$(RUN_ALL_STEPS); \
	step $(MAKE) --no-print-directory gpu-test; \
	step $(MAKE) --no-print-directory gpu-bench; \
	exit $$status

$(GPU_PATH)/megabatch/kernels:
	mkdir -p $(GPU_PATH)/megabatch
	ln -sfn $(CURDIR)/kernels $@

gpu-test: $(GPU_PATH)/megabatch/kernels ## On a CUDA machine: the gpu-marked tests
	$(GPU_ENV) $(GPU_PYTHON) -m pytest -m gpu tests/kernels -p no:cacheprovider -q $(GPU_PYTEST_WORKERS)

gpu-bench: $(GPU_PATH)/megabatch/kernels ## On a CUDA machine: the kernel benchmarks -> docs/benchmarks.md, docs/benchmarks-passes.md
	$(RUN_ALL_STEPS); \
	step env $(GPU_ENV) $(GPU_PYTHON) -m megabatch.kernels.benchmark --device cuda --losses clip,ntxent,siglip,margin; \
	step env $(GPU_ENV) timeout 300 $(GPU_PYTHON) -m megabatch.kernels.benchmark_passes; \
	exit $$status
