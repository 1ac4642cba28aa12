# The README's two commands: `make run` (the gateway) and `make test` (lint and tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint demo smoke bench-core requirements clean

$(BIN)/.runtime: requirements.txt requirements-fast.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-fast.txt 2>/dev/null \
		|| echo "note: gunicorn_h1c, gunicorn's C HTTP parser, could not be installed (building it needs gcc and the Python headers; '$(BIN)/pip install -r requirements-fast.txt' shows why). The gateway works the same on gunicorn's Python parser, at more CPU per request." >&2
	touch $@

$(BIN)/.dev: requirements-dev.txt requirements.txt $(BIN)/.runtime
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

run: $(BIN)/.runtime  ## start the gateway with gunicorn (generates a secret on first run; ADMIN=1 an admin token too)
	scripts/run-gateway.sh

demo: $(BIN)/.runtime  ## the gateway plus three simulated GPU servers that register themselves
	scripts/demo.sh

lint: $(BIN)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint  ## lint, type-check, then every test
	$(BIN)/python -m pytest

# The demo on a venv with the runtime requirements alone: catches a dependency that only the
# dev tools happened to bring in (CI runs this after the tests). It also runs the gateway on
# gunicorn's Python parser, as a machine that cannot build requirements-fast.txt would.
smoke:
	rm -rf .venv-runtime
	$(PYTHON) -m venv .venv-runtime
	.venv-runtime/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
	VENV=.venv-runtime DEMO_ONESHOT=1 DEMO_DIR=.venv-runtime/demo GATEWAY_BIND=127.0.0.1:$${SMOKE_PORT:-5099} \
		WEBHOOK_SECRET="$$($(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(32))')" scripts/demo.sh

bench-core: $(BIN)/.dev  ## the issue-2 figures: health sweep and rotation cost
	$(BIN)/python bench/sweep_bench.py
	$(BIN)/python bench/rotation_bench.py

# Issue 6's suite, never part of `make test`: installs nginx and wrk when missing (apt-get), starts
# and stops everything itself on 127.0.0.1, and writes bench/results.json, docs/benchmarks.md and
# bench/results.png. `make bench BENCH_QUICK=1` is a short smoke run. One section again, the others
# kept from the last run: `.venv/bin/python bench/run_suite.py --only jobs --keep-others`.
.PHONY: bench
$(BIN)/.bench: bench/requirements.txt $(BIN)/.runtime
	$(BIN)/python -m pip install -q --disable-pip-version-check -r bench/requirements.txt
	touch $@

bench: $(BIN)/.bench  ## the benchmark suite: ours beside nginx and a naive gateway (about 7 minutes)
	$(BIN)/python bench/run_suite.py $(if $(filter 1 yes true,$(BENCH_QUICK)),--quick)

# The pinned files are generated, never edited by hand: requirements.txt from pyproject.toml's
# dependencies, the others from their .in files. pip-compile keeps a pin that still fits;
# `make requirements UPGRADE=1` moves every pin to the newest release.
PIP_COMPILE = .venv-tools/bin/pip-compile -q --strip-extras --no-emit-index-url --no-emit-find-links \
	--no-emit-trusted-host $(if $(filter 1 yes true,$(UPGRADE)),--upgrade)
requirements:  ## regenerate the pinned requirement files with pip-tools
	test -x .venv-tools/bin/pip-compile || { $(PYTHON) -m venv .venv-tools && .venv-tools/bin/pip install -q pip-tools==7.6.2; }
	$(PIP_COMPILE) -o requirements.txt pyproject.toml
	$(PIP_COMPILE) -o requirements-fast.txt requirements-fast.in
	$(PIP_COMPILE) --allow-unsafe -o requirements-dev.txt requirements-dev.in
	cd resource_monitor && ../$(PIP_COMPILE) -o requirements.txt requirements.in
	cd bench && ../$(PIP_COMPILE) -o requirements.txt requirements.in

clean:
	rm -rf $(VENV) .venv-runtime .venv-tools .pytest_cache .ruff_cache .mypy_cache .demo
