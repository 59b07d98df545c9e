# dm-agent — every job a contributor or CI runs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# The architectures the frozen program and the packages are built for: both by default;
# `make packages ARCH=amd64` (or arm64) builds one. The two pipelines are independent
# until the repository: `make -j2 repo` builds them side by side.
ARCH ?= amd64 arm64
FROZEN_ARCHES := $(addprefix frozen-,$(ARCH))
PACKAGE_ARCHES := $(addprefix packages-,$(ARCH))

.DEFAULT_GOAL := help

help: ## list every job
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-z-]*:.*## / {printf "  make %-13s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(BIN)/dm-agent: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

venv: $(BIN)/dm-agent ## create .venv with dm-agent (editable) and the test tools

# `make run` needs only what running needs: its own small venv, without the test extra
RUN_VENV ?= .venv-run
$(RUN_VENV)/bin/dm-agent: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(RUN_VENV)
	$(RUN_VENV)/bin/pip install -q -e .
	@touch $@

run: $(RUN_VENV)/bin/dm-agent ## print one real registration from the local Docker and host (no master, no root; runtime dependencies only)
	$(RUN_VENV)/bin/dm-agent --once --dry-run -v

deps: ## install the Debian packages the tests use (as root: docker.io, debootstrap, rpm, ...)
	bash .ci/deps

lint: venv ## ruff over the code, tests and benchmarks; shellcheck over the scripts; ansible-lint over the role
	$(BIN)/ruff check dm_agent tests bench
	shellcheck -x .ci/run .ci/deps packaging/*.sh
	shellcheck -s sh debian/dm-agent.postinst
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/ansible-lint --offline --strict deploy/ansible

typecheck: venv ## mypy --strict over the package
	$(BIN)/mypy

# The tiers are defined once, by the markers each leaves out: TIERS in tests/conftest.py
# (docs/developer-guide.md, Test tiers).
unit: venv ## the unit tier: no root, Docker or real agent's intervals; under a minute
	$(BIN)/pytest --tier unit $(PYTEST_ARGS)

check-fast: venv ## ruff, mypy and the fast test tier: no root, Docker or booted roots, a few minutes
	$(BIN)/ruff check dm_agent tests bench
	$(BIN)/mypy
	$(BIN)/pytest --tier fast $(PYTEST_ARGS)

# --unprivileged: the fast tier's tests run as a new unprivileged user, beside the rest
# (tests/support/unprivileged.py), so that its "no root" is proven at every run.
test: venv ## the test suite (root: it starts dockerd, boots systemd roots; needs `make frozen`); its fast tier as a new unprivileged user
	$(BIN)/pytest --unprivileged --durations=30 $(PYTEST_ARGS)

# (the two architectures' pipelines side by side: the arm64 root's debootstrap and
# emulated steps overlap the amd64 build root and freeze)
check: deps lint typecheck ## everything CI runs: deps, lint, types, frozen programs, packages, repo, image, the whole suite
	$(MAKE) -j2 --output-sync=target repo
	$(MAKE) image
	$(MAKE) test

check-loaded: deps ## make check while stress-ng keeps both cores busy: the suite must not depend on an idle machine
	stress-ng --cpu "$$(nproc)" --timeout 0 --quiet & trap 'kill $$!' EXIT; $(MAKE) check

frozen: $(FROZEN_ARCHES) ## the frozen program in build/frozen[-arm64]/dm-agent/ and the tarballs in dist/ (root; Debian 11 build roots cached in /var/cache; ARCH=amd64 or arm64 for one)

$(FROZEN_ARCHES): frozen-%:
	packaging/freeze.sh --arch $*

smoke-frozen: frozen-amd64 ## run the frozen program in a bare Debian 11 root without Python
	packaging/smoke-frozen.sh

packages: $(PACKAGE_ARCHES) ## dist/: the .deb, .rpm, tarball and bill of materials of amd64 and arm64 (ARCH=amd64 or ARCH=arm64 for one)

$(PACKAGE_ARCHES): packages-%: frozen-%
	packaging/build-deb.sh --arch $*
	packaging/build-rpm.sh --arch $*

repo: packages ## signed apt and yum repositories of the ARCH packages in dist/repo/ (throwaway key unless DM_REPO_KEY; refused for a release)
	DM_REPO_ARCHES="$(ARCH)" packaging/build-repo.sh

image: frozen ## the container image: OCI index (amd64 + arm64) and per-arch docker archives in dist/ (root; buildah, skopeo, umoci, pigz)
	packaging/build-image.sh $(addprefix --arch ,$(ARCH))

figures: venv ## the figures the documents quote: test counts and bcrypt's cost into docs/figures.json, then every quote
	$(BIN)/python bench/figures.py counts bcrypt docs

bench: venv frozen ## benchmarks of the frozen program with their targets (root: private dockerd)
	$(BIN)/python bench/bench_agent.py $(BENCH_ARGS)

bench-gateway: venv frozen-amd64 ## the gateway beside dockerd's own TLS listener: throughput, latency, streams (root)
	$(BIN)/python bench/bench_gateway.py $(BENCH_ARGS)

bench-tunnel: venv frozen-amd64 ## the tunnel through a real sshd relay: throughput vs the gateway direct, memory, 500 tunnels on one relay (root)
	$(BIN)/python bench/bench_tunnel.py $(BENCH_ARGS)

bench-image: venv image ## the image run by the master's line: size per architecture, docker stop, restart, health (root)
	$(BIN)/python bench/bench_image.py $(BENCH_ARGS)

clean: ## remove build outputs and caches (not the cached build roots in /var/cache)
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis $(RUN_VENV)

.PHONY: help venv run deps lint typecheck unit figures test check check-fast check-loaded clean frozen smoke-frozen packages repo image bench bench-gateway bench-tunnel bench-image \
  $(FROZEN_ARCHES) $(PACKAGE_ARCHES)
