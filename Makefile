# The two commands (README): `make run` and `make test`. Both do all set-up first.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: setup build run test lint bench

## Fetch libtorch (PyPI wheel → .libtorch/) and the dataset; idempotent and cached.
setup:
	deploy/setup.sh

build: setup
	$(CARGO) build --release

## Build and start sluice on the shipped default model.
run: build
	target/release/sluice model info resnet20 --input 1x1x28x28

## The whole test suite (what CI runs): formatting, lints, unit and integration tests.
test: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test --all-targets

## Criterion benchmarks (not part of the tests).
bench: setup
	$(CARGO) bench --bench engine
