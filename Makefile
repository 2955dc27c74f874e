# The two commands (README): `make run` and `make test`. Both do all set-up first.
SHELL := /bin/bash
CARGO ?= cargo
PYTHON := .venv/bin/python

.PHONY: setup build run test test-env lint bench bench-server

## Fetch libtorch (PyPI wheel → .libtorch/) and the dataset; idempotent and cached.
setup:
	deploy/setup.sh

build: setup
	$(CARGO) build --release

## Build and serve the shipped model repository (deploy/models) on ports 8000/8001/8002.
run: build
	target/release/sluice serve --model-repository deploy/models

## The Python clients the tests use (tritonclient, perf_analyzer, promtool); cached.
test-env:
	deploy/setup-test-env.sh

## The whole test suite (what CI runs): formatting, lints, Rust unit and integration tests,
## Triton's clients and perf_analyzer against a real server, a real Prometheus, the gRPC
## wire-compatibility check, and the dashboard/alert checks.
test: setup test-env
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test --all-targets
	$(PYTHON) tests/proto_compat/check.py
	$(PYTHON) tests/python/test_clients.py target/debug/sluice
	$(PYTHON) tests/python/test_prometheus.py target/debug/sluice
	deploy/check-observability.sh

## Criterion benchmarks and the engine's realized-speedup table (not part of the tests).
bench: setup
	$(CARGO) bench --bench engine
	$(CARGO) run --release -- bench engine

## perf_analyzer against the shipped model over HTTP and gRPC (docs/benchmarks.md).
bench-server: build test-env
	benches/server.sh
