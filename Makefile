# micro — every target creates .venv itself when it is missing or stale.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTHON ?= python3

.DEFAULT_GOAL := help

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## create .venv and install micro with its dev extras

run: $(STAMP) ## run the example system (services, agents, a flow) with `micro run examples/tasks`
	$(VENV)/bin/micro run examples/tasks

test: $(STAMP) ## run the whole test suite (real NATS and PostgreSQL servers are started by fixtures)
	$(PY) -m pytest -q

bench: $(STAMP) ## run benchmarks/ and write benchmarks/RESULTS.md
	$(PY) -m benchmarks

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

.PHONY: venv run test bench proto lint help
