# dm-agent — every job a contributor or CI runs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help: ## list every job
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-z-]*:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(BIN)/dm-agent: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

venv: $(BIN)/dm-agent ## create .venv with dm-agent (editable) and the test tools

run: venv ## print one real registration from the local Docker and host (no master needed)
	$(BIN)/dm-agent --once --dry-run -v

deps: ## install the Debian packages the tests use (as root: docker.io, debootstrap, rpm, ...)
	bash .ci/deps

lint: venv ## ruff over the code, tests and benchmarks
	$(BIN)/ruff check dm_agent tests bench

typecheck: venv ## mypy --strict over the package
	$(BIN)/mypy

test: venv ## the test suite (needs root: it starts its own dockerd)
	$(BIN)/pytest $(PYTEST_ARGS)

check: deps lint typecheck test ## everything CI runs: deps, lint, types, the whole suite

clean: ## remove build outputs and caches (not the cached build roots in /var/cache)
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis

.PHONY: help venv run deps lint typecheck test check clean
