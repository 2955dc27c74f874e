# The two commands (README): `make run` and `make test`. Both do all set-up first.
SHELL := /bin/bash
CARGO ?= cargo
PYTHON := .venv/bin/python

.PHONY: setup build run test test-env lint bench bench-server soak bench-hostile fuzz bench-reference bench-peers bench-byom bench-byom-t15 bench-slo image image-test

## Fetch libtorch (PyPI wheel → .libtorch/) and the dataset; idempotent and cached.
setup:
	deploy/setup.sh

build: setup
	$(CARGO) build --release

## Build and serve the shipped model repository (deploy/models) on ports 8000/8001/8002.
run: build
	target/release/sluice serve --model-repository deploy/models

## The container image localhost/sluice:local, built with podman from the Dockerfile
## (deploy/image/build.sh; base images bootstrapped from Debian's packages where the official
## ones cannot be pulled). `image-test` runs it and checks HTTP, gRPC, health, the non-root
## user and the drain on `podman stop` (deploy/image/test.sh).
image:
	deploy/image/build.sh

image-test: image test-env
	deploy/image/test.sh

## The Python clients the tests use (tritonclient, perf_analyzer, promtool); cached.
test-env:
	deploy/setup-test-env.sh

## The whole test suite (what CI runs): formatting, lints, Rust unit and integration tests,
## Triton's clients and perf_analyzer against a real server, a real Prometheus, three replicas
## behind haproxy following one policy file, the gRPC wire-compatibility check, and the
## dashboard/alert checks.
test: setup test-env
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test --all-targets
	$(PYTHON) tests/proto_compat/check.py
	$(PYTHON) tests/python/test_clients.py target/debug/sluice
	$(PYTHON) tests/python/test_prometheus.py target/debug/sluice
	$(PYTHON) tests/python/test_fleet.py target/debug/sluice
	deploy/check-observability.sh
	deploy/check-kubernetes.sh

## Criterion benchmarks and the engine's realized-speedup table (not part of the tests).
bench: setup
	$(CARGO) bench --bench engine
	$(CARGO) run --release -- bench engine

## perf_analyzer against the shipped model over HTTP and gRPC (docs/benchmarks.md).
bench-server: build test-env
	benches/server.sh

## Soak (not in CI): 30 minutes at saturation over HTTP and gRPC (valid, invalid, image and
## over-limit requests), a policy change every 10 s, SIGTERM at the end; RSS/fd plot and
## figures in runs/soak/ (benches/soak.py --help).
soak: build test-env
	$(PYTHON) benches/soak.py

## Robustness benchmarks (not in CI): hostile requests from 64 clients, 1 000 slowloris
## connections, health/metrics latency under PNG load. All three run; fails if one did.
bench-hostile: build test-env
	@rc=0; \
	$(PYTHON) benches/hostile.py || rc=1; \
	$(PYTHON) benches/slowloris.py || rc=1; \
	$(PYTHON) benches/health_latency.py || rc=1; \
	exit $$rc

## sluice's dense engine (channels-last, onednn, bf16) against PyTorch eager/TorchScript, ONNX
## Runtime and OpenVINO on the same weights (not in CI; benches/setup-bench-env.sh installs
## the runtimes into .cache/bench-venv, ~4.5 GB).
bench-reference: build
	@py=$$(benches/setup-bench-env.sh) && $$py benches/pytorch_reference.py

## sluice against KServe's Python server and TorchServe serving the same dense weights, one
## neutral load generator (wrk), concurrency 1/8/32 (not in CI; benches/setup-peers-env.sh
## installs them into .cache/peers-venv with Java 17 and wrk).
bench-peers: build test-env
	benches/setup-peers-env.sh >/dev/null
	$(PYTHON) benches/peers.py

## Bring your own model, end to end (not in CI, ~1.5 h): Fashion-MNIST as a folder of RGB
## PNGs, a dense ResNet-20 trained on it in PyTorch, then sluice import -> retrofit ->
## calibrate -> eval, and the same gated network from scratch for 8 epochs to compare
## training times (benches/byom/run.sh; outputs in runs/byom/).
bench-byom: build
	SCRATCH_EPOCHS=$${SCRATCH_EPOCHS:-8} benches/byom/run.sh

## Issue 13's targets from a well-trained teacher (not in CI, ~1.5 h): the cached fifteen-epoch
## PyTorch teacher (benches/byom/teacher-t15/), a three-epoch retrofit at distillation
## temperature 4, and eleven epochs from scratch to compare (outputs in runs/byom-t15-t4/, a
## folder of its own: run.sh skips every step whose output exists, whatever its settings).
bench-byom-t15: build
	mkdir -p runs/byom-t15-t4
	[ -f runs/byom-t15-t4/teacher.json ] && [ -f runs/byom-t15-t4/teacher.safetensors ] || \
	  cp benches/byom/teacher-t15/teacher.json benches/byom/teacher-t15/teacher.safetensors runs/byom-t15-t4/
	IMAGES=$${IMAGES:-runs/byom/images} RETROFIT_EPOCHS=3 DISTILL_TEMPERATURE=4 \
	  SCRATCH_EPOCHS=$${SCRATCH_EPOCHS:-11} benches/byom/run.sh runs/byom-t15-t4

## The latency-SLO proof of issue 14 (not in CI, ~12 min): the dense model's batch-1 latency
## (SLO p99 = 4x) and saturation throughput, then one seeded Poisson schedule (0.5x, 2x, 0.5x
## saturation, PHASE_SECONDS=60 each) against three servers: the adaptive budget controller,
## fixed dense, fixed floor budget (benches/slo/run.sh; tables, goodput, slo.svg in runs/slo/).
bench-slo: build test-env
	benches/slo/run.sh

## Fuzz the request decoders with cargo-fuzz (fuzz/README.md; not part of `make test`):
## each target for FUZZ_SECONDS seconds, one after another, from its committed seed corpus
## (new inputs go to fuzz/target/corpus/, crashes to fuzz/artifacts/). The stable toolchain
## runs cargo-fuzz through RUSTC_BOOTSTRAP=1; cargo-fuzz is installed on first use.
FUZZ_SECONDS ?= 60
FUZZ_FLAGS = -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -timeout=60 -print_final_stats=1
fuzz: setup
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	RUSTC_BOOTSTRAP=1 $(CARGO) fuzz build
	@set -e; for t in binary_split http_json grpc_convert grpc_structured image_decode; do \
	  len=65536; [ $$t = image_decode ] && len=262144; \
	  mkdir -p fuzz/target/corpus/$$t fuzz/corpus/$$t; \
	  echo "== fuzz $$t ($(FUZZ_SECONDS) s)"; \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$t fuzz/target/corpus/$$t fuzz/corpus/$$t -- \
	    -max_len=$$len $(FUZZ_FLAGS); \
	done
