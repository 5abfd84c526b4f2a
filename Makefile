# The few verbs people type. `make setup` then `make run` brings the service up on the bundled model.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# The CPU build of torch (a plain `pip install torch` pulls a multi-GB CUDA build).
# On a GPU host: make setup TORCH=torch
TORCH ?= torch==2.13.0

.PHONY: setup run test test-tools lint proto bench

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[model,test]'

run:
	$(BIN)/edm-serve up

# The deploy tests need promtool/prometheus (Debian) and schema checkers (PyPI): installed once, idempotent.
test-tools:
	VENV=$(VENV) bash deploy/ci-install.sh

test: test-tools
	$(BIN)/python -m pytest

lint:
	$(BIN)/ruff check .

bench:
	$(BIN)/python bench/sampler.py --model model/bundled/edm-digits-8x8-cond.json --batch 64 --steps 18
