# micro — every target creates .venv itself when it is missing or stale.
VENV      ?= .venv
PY        := $(VENV)/bin/python
RUN_STAMP := $(VENV)/.installed-run
STAMP     := $(VENV)/.installed-dev
PYTHON    ?= python3
DIST      ?= dist
PIP       := $(PY) -m pip install --disable-pip-version-check --progress-bar on

.DEFAULT_GOAL := help

$(RUN_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing micro and what running needs (micro[all]) into $(VENV): a minute or two the first time"
	$(PIP) -e '.[all]'
	touch $@

$(STAMP): $(RUN_STAMP)
	@echo "Adding the test and lint tools (micro[dev]) to $(VENV)"
	$(PIP) -e '.[dev]'
	touch $@

venv: $(STAMP) ## create .venv and install micro with its dev extras (test and lint tools)

run: $(RUN_STAMP) ## run the example system (services, agents, a flow) with `micro run examples/tasks`
	@echo "In another terminal: cd $(CURDIR) && . $(VENV)/bin/activate   (puts micro on PATH)"
	@echo "then: micro services, micro chat, micro agent list -- the tour in README.md"
	MICRO_BROKER=$${MICRO_BROKER:-local://} $(VENV)/bin/micro run examples/tasks

test: $(STAMP) browser ## run the whole test suite (real NATS and PostgreSQL servers are started by fixtures)
	$(PY) -m pytest -q

# the dashboard's browser tests (tests/test_dashboard_browser.py) drive Debian's Chromium through its driver
browser: ## install Debian's chromium and chromium-driver when they are missing (apt-get; sudo when not root)
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	    echo "Installing Debian's chromium and chromium-driver for the dashboard's browser tests"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

bench: $(STAMP) ## run benchmarks/ and write benchmarks/RESULTS.md
	$(PY) -m benchmarks

dist: ## build the wheel into dist/ (pip install 'dist/micro-0.1.0-py3-none-any.whl[all]')
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip wheel --disable-pip-version-check --no-deps --wheel-dir $(DIST) .

proto: $(STAMP) ## regenerate micro/_proto from proto/ (betterproto2 for ours; a descriptor set for grpc's health and reflection)
	rm -rf micro/_proto && mkdir -p micro/_proto
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m grpc_tools.protoc -I proto --python_betterproto2_out=micro/_proto \
		--python_betterproto2_opt=client_generation=async \
		--python_betterproto2_opt=server_generation=async proto/*.proto
	$(PY) -m grpc_tools.protoc -I proto --descriptor_set_out=micro/_proto/standard.binpb \
		proto/grpc/health/v1/health.proto proto/grpc/reflection/v1/reflection.proto \
		proto/grpc/reflection/v1alpha/reflection.proto

lint: $(STAMP) ## ruff + mypy (strict) on micro/
	$(VENV)/bin/ruff check micro tests benchmarks examples
	$(VENV)/bin/mypy

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 10

.PHONY: venv run test browser bench dist proto lint help
