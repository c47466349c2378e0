# The commands the README documents. `make test` is what CI runs.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-fast test-releases run bench

setup:
	@scripts/setup

## Everything: install what is missing, start RabbitMQ if needed, run all tests
## over the compiled paths, then the fast ones again over their Python twins
## (tests/conftest.py: --implementation; the peers inherit it), then the RPC and
## REST suites under each older OpenStack release's pins (last: a broken build
## fails fast, before any release venv is built).
test: setup
	@scripts/ensure-rabbitmq
	$(PY) -m pytest --implementation=compiled
	$(PY) -m pytest --implementation=python -m "not slow"
	@scripts/test-releases

## The RPC and REST suites against each release in constraints/ (2025.2, 2026.1),
## each in its own .venv-<release>.
test-releases: setup
	@scripts/ensure-rabbitmq
	@scripts/test-releases

## The fast tests only (no multi-process end-to-end runs).
test-fast: setup
	@scripts/ensure-rabbitmq
	$(PY) -m pytest -m "not slow"

## The main job: the emulated control plane with its collector on 127.0.0.1:9780
## (embedded: no broker needed).
run: setup
	$(VENV)/bin/commlens demo --listen 127.0.0.1:9780

## The benchmarks: RPC (rabbit:// vs commlens+rabbit://) and WSGI (wrk), compiled and pure
## Python side by side, each also counted by callgrind, the agent's installed size and
## import time, collector ingest, the control plane at 1,000 emulated agents, and
## 10 minutes of faults against the emulated plane's own ground truth.
bench: setup
	@scripts/ensure-rabbitmq
	$(PY) benchmarks/rpc_overhead.py
	$(PY) benchmarks/rpc_instructions.py
	$(PY) benchmarks/wsgi_overhead.py
	$(PY) benchmarks/wsgi_instructions.py
	$(PY) benchmarks/agent_footprint.py
	$(PY) benchmarks/collector_ingest.py
	$(PY) benchmarks/emulate_scale.py
	$(PY) benchmarks/fault_soak.py
