# The two set-up commands of the README: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml tests/azurite/package-lock.json | $(BIN)/python
	@# The local-change matrix runs rsync for real; the listing-gap tests run the agent as an
	@# unprivileged user through setpriv (util-linux).
	@command -v rsync >/dev/null && command -v setpriv >/dev/null || \
		{ [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq rsync util-linux; } || \
		{ echo "the tests need rsync and setpriv: apt-get install rsync util-linux" >&2; exit 1; }
	$(BIN)/pip install -q -e '.[test]'
	npm ci --prefix tests/azurite --no-audit --no-fund --loglevel=error
	touch $@ $(VENV)/.installed

## Install and run the agent on the quickstart config (SQLite ledger, local example folder).
run: $(VENV)/.installed
	$(BIN)/bucketsync -c config/quickstart.toml run

## Install what the tests need (emulators included) and run lint and the whole suite.
test: $(VENV)/.test-installed
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest

bench: $(VENV)/.test-installed
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/sync_memory.py --write docs/benchmarks.md

clean:
	rm -rf $(VENV) tests/azurite/node_modules var
