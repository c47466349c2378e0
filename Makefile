# The commands the README documents. `make test` is what CI runs.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-all test-fast test-releases test-openstack run bench

setup:
	@scripts/setup

## Everything: install what is missing, start RabbitMQ if needed, run all tests
## over the compiled paths, then the fast ones again over their Python twins
## (tests/conftest.py: --implementation; the peers inherit it), then the RPC and
## REST suites under each OpenStack release's pins, each on its own Python (last: a
## broken build fails fast, before any release venv is built).
test: setup
	@scripts/ensure-rabbitmq
	$(PY) -m pytest --implementation=compiled
	$(PY) -m pytest --implementation=python -m "not slow"
	@scripts/test-releases

## The RPC and REST suites against each release in constraints/ (2025.2 on Python
## 3.10, 2026.1 on 3.13, 2026.2 on 3.12: each file's `# python:` line), each in its
## own .venv-<release>; a C compiler warning fails the release's leg.
test-releases: setup
	@scripts/ensure-rabbitmq
	@scripts/test-releases

## commlens on a real Nova 34 control plane from PyPI (OpenStack 2026.2), its services
## in .venv-openstack: tests/openstack_plane/ (docs/testing.md: "On a real Nova").
test-openstack: setup
	@scripts/ensure-rabbitmq
	@scripts/test-openstack

## `make test` and the real Nova plane: what CI's 90 minutes could hold, but
## not `make test`'s 45 (the plane's venv alone takes about 5 minutes fresh).
test-all: test test-openstack

## The fast tests only (no multi-process end-to-end runs).
test-fast: setup
	@scripts/ensure-rabbitmq
	$(PY) -m pytest -m "not slow"

## The main job: the emulated control plane with its collector on 127.0.0.1:9780
## (embedded: no broker needed).
run: setup
	$(VENV)/bin/commlens demo --listen 127.0.0.1:9780 $(ARGS)

## The benchmarks: RPC (rabbit:// vs commlens+rabbit://) and WSGI (wrk), compiled and pure
## Python side by side, each also counted by callgrind, the agent's installed size and
## import time, collector ingest (and with OTLP export on), the control plane at 1,000 emulated agents, and
## 10 minutes of faults against the emulated plane's own ground truth.
bench: setup
	@scripts/ensure-rabbitmq
	$(PY) benchmarks/rpc_overhead.py
	$(PY) benchmarks/rpc_instructions.py
	$(PY) benchmarks/wsgi_overhead.py
	$(PY) benchmarks/wsgi_instructions.py
	$(PY) benchmarks/agent_footprint.py
	$(PY) benchmarks/collector_ingest.py
	$(PY) benchmarks/otlp_export.py
	$(PY) benchmarks/emulate_scale.py
	$(PY) benchmarks/fault_soak.py
