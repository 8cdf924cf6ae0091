# The two set-up commands of the README: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Locks are resolved for the image's and CI's platform; every file of each pinned release is hashed.
LOCK_ARGS := --generate-hashes --python-version 3.11.7 --python-platform x86_64-manylinux_2_28 --no-header

# The suite runs on up to 4 workers (one per core), a test file per worker: its daemons and
# emulators wait on I/O much of the time, and module fixtures stay shared within a file.
PYTEST_WORKERS ?= -n auto --maxprocesses 4 --dist loadfile

.PHONY: run test lint bench clean lock system-tools

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml requirements.lock | $(BIN)/python
	$(BIN)/pip install -q --require-hashes -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# CI installs exactly the locked, hash-checked dependencies; `pip check` fails if the lock is
# missing something pyproject.toml asks for (then run `make lock`).
$(VENV)/.test-installed: pyproject.toml requirements-test.lock tests/azurite/package-lock.json | $(BIN)/python
	$(BIN)/pip install -q --require-hashes -r requirements-test.lock
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip check || { echo "requirements-test.lock is stale: run make lock" >&2; exit 1; }
	npm ci --prefix tests/azurite --no-audit --no-fund --loglevel=error
	$(MAKE) system-tools
	touch $@ $(VENV)/.installed

## Tools the tests run that come from Debian, not PyPI: rsync and setpriv, systemd-analyze (the unit's verify and
## security score) and promtool (the alert rules). promtool is unpacked from Debian's prometheus
## package into the venv, so no Prometheus server gets installed or started.
system-tools: | $(BIN)/python
	@# The local-change matrix runs rsync for real; the non-root tests run the agent through setpriv.
	@command -v rsync >/dev/null && command -v setpriv >/dev/null || { \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends rsync util-linux; }
	@command -v systemd-analyze >/dev/null || { \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd; }
	@test -x $(BIN)/promtool || { \
	  if command -v promtool >/dev/null; then ln -sf "$$(command -v promtool)" $(BIN)/promtool; else \
	    tmp=$$(mktemp -d) && ( cd $$tmp && { apt-get download prometheus 2>/dev/null || \
	      { apt-get update -q && apt-get download prometheus; }; } && dpkg-deb -x prometheus_*.deb root ) && \
	    cp $$tmp/root/usr/bin/promtool $(BIN)/promtool && rm -rf $$tmp; fi; }
	@systemd-analyze --version | head -1 && $(BIN)/promtool --version 2>&1 | head -1

## Re-resolve requirements.lock (runtime: the image) and requirements-test.lock (CI) from PyPI.
lock: | $(BIN)/python
	$(BIN)/pip install -q uv
	@# Seeded with the current locks: uv keeps every pin it can and moves only what pyproject.toml asks.
	cp requirements.lock requirements.lock.new && cp requirements-test.lock requirements-test.lock.new
	$(BIN)/uv pip compile pyproject.toml $(LOCK_ARGS) --only-binary :all: -o requirements.lock.new
	$(BIN)/uv pip compile pyproject.toml --extra test $(LOCK_ARGS) -o requirements-test.lock.new
	{ sed -n '1,3p' requirements.lock; cat requirements.lock.new; } > requirements.lock.tmp && mv requirements.lock.tmp requirements.lock
	{ sed -n '1,2p' requirements-test.lock; cat requirements-test.lock.new; } > requirements-test.lock.tmp && mv requirements-test.lock.tmp requirements-test.lock
	rm -f requirements.lock.new requirements-test.lock.new

## Install and run the agent on the quickstart config (SQLite ledger, local example folder).
run: $(VENV)/.installed
	$(BIN)/bucketsync -c config/quickstart.toml run

## Install what the tests need (emulators and system tools included) and run lint and the whole suite.
test: $(VENV)/.test-installed
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest $(PYTEST_WORKERS)

bench: $(VENV)/.test-installed
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/sync_memory.py --write docs/benchmarks.md

clean:
	rm -rf $(VENV) tests/azurite/node_modules var
