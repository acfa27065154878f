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
	@command -v chromium >/dev/null || { echo "[setup] installing chromium (apt; the console's browser test)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "[setup] warning: could not install chromium; the browser test will be skipped"; }
	@$(BIN)/pdserve fetch-model
	@if [ -x deploy/fetch-helm.sh ]; then deploy/fetch-helm.sh >/dev/null || echo "[setup] warning: helm not fetched; chart tests will skip"; fi

# pip runs again only when pyproject.toml changes (idempotent and fast when already done).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "[setup] installing pdserve and its pinned dependencies into $(VENV)"
	@$(BIN)/pip install -q --upgrade pip
	@$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

run: setup
	$(BIN)/pdserve up

# The suite runs in a private network namespace (only `lo`, up) when we are root, so nothing a
# test starts can reach or be reached from outside, and ports never collide with the host.
NETNS := $(shell [ "$$(id -u)" = 0 ] && unshare -n true 2>/dev/null && echo yes)
test: setup
ifeq ($(NETNS),yes)
	unshare -n -- sh -c 'ip link set lo up && exec $(BIN)/python -m pytest -q $(PYTEST_ARGS)'
else
	@echo "[test] not root or no unshare: running without a private network namespace"
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
endif

bench: setup
	$(BIN)/python benchmarks/engine.py --quick
	@if [ -f benchmarks/transfer.py ]; then $(BIN)/python benchmarks/transfer.py --quick; fi
	@if [ -f benchmarks/prefix.py ]; then $(BIN)/python benchmarks/prefix.py --quick; fi
	@if [ -f benchmarks/goodput.py ]; then $(BIN)/python benchmarks/goodput.py --quick; fi

lint:
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
