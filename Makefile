# dm-agent — every job a contributor or CI runs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help: ## list every job
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-z-]*:.*## / {printf "  make %-13s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

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

lint: venv ## ruff over the code, tests and benchmarks; shellcheck over the scripts; ansible-lint over the role
	$(BIN)/ruff check dm_agent tests bench
	shellcheck -x .ci/run .ci/deps packaging/*.sh
	shellcheck -s sh debian/dm-agent.postinst
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/ansible-lint --offline --strict deploy/ansible

typecheck: venv ## mypy --strict over the package
	$(BIN)/mypy

test: venv ## the test suite (root: it starts dockerd, boots systemd roots; needs `make frozen`)
	$(BIN)/pytest $(PYTEST_ARGS)

check: deps lint typecheck repo test ## everything CI runs: deps, lint, types, frozen program, packages, repo, the whole suite

frozen: ## the frozen program in build/frozen/dm-agent/ and the tarball in dist/ (root; Debian 11 build root cached in /var/cache)
	packaging/freeze.sh

smoke-frozen: frozen ## run the frozen program in a bare Debian 11 root without Python
	packaging/smoke-frozen.sh

packages: frozen ## dist/: the .deb, the .rpm, the tarball and the bill of materials
	packaging/build-deb.sh
	packaging/build-rpm.sh

repo: packages ## signed apt and yum repositories in dist/repo/ (throwaway key unless DM_REPO_KEY; refused for a release)
	packaging/build-repo.sh

bench: venv frozen ## benchmarks of the frozen program with their targets (root: private dockerd)
	$(BIN)/python bench/bench_agent.py $(BENCH_ARGS)

clean: ## remove build outputs and caches (not the cached build roots in /var/cache)
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis

.PHONY: help venv run deps lint typecheck test check clean frozen smoke-frozen packages repo bench
