# pdserve — the two commands: `make run` and `make test` (both set up first).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pdserve-setup
PYTEST_ARGS ?=

.PHONY: setup run test bench clean lint

setup: $(STAMP)
	@command -v redis-server >/dev/null || { echo "[setup] installing redis-server (apt)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
	  || echo "[setup] warning: could not install redis-server; Redis-backed features will be skipped"; }
	@$(BIN)/pdserve fetch-model >/dev/null

# pip runs again only when pyproject.toml changes (idempotent and fast when already done).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "[setup] installing pdserve and its pinned dependencies into $(VENV)"
	@$(BIN)/pip install -q --upgrade pip
	@$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

run: setup
	$(BIN)/pdserve chat

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/engine.py --quick

lint:
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
