#!/usr/bin/env bash
# Server benchmark (a documented command, not a CI test): perf_analyzer at concurrency 1, 2,
# 4 and 8 over HTTP (binary tensors) and gRPC against the shipped model at batch 1, and the
# server overhead = p50 latency at concurrency 1 minus the engine-only forward time of the
# same input, measured in the same run. Usage: benches/server.sh [model-repository] [model]
set -euo pipefail
cd "$(dirname "$0")/.."
repo=${1:-deploy/models}
model=${2:-fashion-resnet20}
sluice=${SLUICE:-target/release/sluice}
perf=.venv/bin/perf_analyzer
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT

# One real Fashion-MNIST test image (normalised) as perf_analyzer's input and the engine's.
.venv/bin/python - "$work" <<'PY'
import gzip, json, sys, numpy as np
raw = gzip.open("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").read()
img = np.frombuffer(raw, np.uint8, offset=16)[:784].astype(np.float32) / 255.0
x = ((img - 0.2860) / 0.3530).round(6).tolist()
json.dump({"data": [{"input": {"content": x, "shape": [1, 28, 28]}}]}, open(f"{sys.argv[1]}/pa.json", "w"))
json.dump({"shape": [1, 1, 28, 28], "data": x}, open(f"{sys.argv[1]}/tensor.json", "w"))
PY


"$sluice" serve --model-repository "$repo" --address 127.0.0.1 --http-port 0 --grpc-port 0 \
  --metrics-port 0 --admin-port 0 >"$work/serve.out" 2>"$work/serve.err" &
server=$!
until grep -q "sluice ready" "$work/serve.out"; do
  kill -0 $server 2>/dev/null || { cat "$work/serve.err"; exit 1; }
  sleep 0.2
done
http=$(grep -o 'http=[^ ]*' "$work/serve.out" | cut -d= -f2)
grpc=$(grep -o 'grpc=[^ ]*' "$work/serve.out" | cut -d= -f2)
metrics=$(grep -o 'metrics=[^ ]*' "$work/serve.out" | cut -d= -f2)
# The engine-only forward runs with the libtorch threads the server gave the model's engines.
threads=$(grep -a "engine ready" "$work/serve.out" "$work/serve.err" | grep -a "engine-$model-0" \
  | grep -o "threads=[0-9]*" | head -1 | cut -d= -f2 || true)
engine() { "$sluice" bench forward "$repo/$model" --input "$work/tensor.json" --iterations 1000 --threads "${threads:-2}" \
  | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["median_ms"])'; }
# Batches the model has run and rows in them, from the server's own metrics.
batches() { .venv/bin/python - "$metrics" "$model" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics").read().decode()
def value(name):
    key = f'{name}{{model="{sys.argv[2]}"}}'
    return next((float(l.split()[-1]) for l in text.splitlines() if l.startswith(key)), 0.0)
print(int(value("sluice_batch_size_count")), int(value("sluice_batch_size_sum")))
PY
}

engine_before=$(engine)
# One perf_analyzer run per level: a level that cannot stabilise on this noisy machine is
# reported as missing instead of ending the sweep.
for proto in http grpc; do
  url=$http; [ $proto = grpc ] && url=$grpc
  for c in 1 2 4 8; do
    before=$(batches)
    "$perf" -m "$model" -u "$url" -i $proto --input-data "$work/pa.json" --concurrency-range $c:$c \
      --measurement-interval 4000 --stability-percentage 25 --max-trials 20 --percentile 50 \
      -f "$work/$proto-$c.csv" >"$work/$proto-$c.log" 2>&1 \
      || { echo "perf_analyzer $proto c=$c failed:"; tail -5 "$work/$proto-$c.log"; }
    echo "$before $(batches)" >"$work/$proto-$c.batches"
  done
done
engine_after=$(engine)

.venv/bin/python - "$work" "$engine_before" "$engine_after" <<'PY'
import csv, sys
work, before, after = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
engine = (before + after) / 2
print(f"engine-only forward, batch 1: {engine:.3f} ms (before {before:.3f}, after {after:.3f})\n")
print("| protocol | concurrency | throughput infer/s | p50 ms | p99 ms | mean batch |")
print("|---|---|---|---|---|---|")
def mean_batch(proto, c):
    try:
        b0, r0, b1, r1 = map(int, open(f"{work}/{proto}-{c}.batches").read().split())
        return f"{(r1 - r0) / (b1 - b0):.2f}"
    except (OSError, ValueError, ZeroDivisionError):
        return ""
for proto in ("http", "grpc"):
    rows = {}
    for c in (1, 2, 4, 8):
        try:
            rows[c] = next(csv.DictReader(open(f"{work}/{proto}-{c}.csv")))
        except (OSError, StopIteration):
            print(f"| {proto} | {c} | (no stable measurement) | | | |")
    for c, r in rows.items():
        print(f"| {proto} | {c} | {float(r['Inferences/Second']):.1f} | "
              f"{int(r['p50 latency'])/1000:.3f} | {int(r['p99 latency'])/1000:.3f} | {mean_batch(proto, c)} |")
    if 1 in rows:
        print(f"| {proto} | server overhead at c=1: {int(rows[1]['p50 latency'])/1000 - engine:.3f} ms | | | | |")
    if 1 in rows and 8 in rows:
        ratio = float(rows[8]['Inferences/Second']) / float(rows[1]['Inferences/Second'])
        print(f"| {proto} | c8/c1 throughput {ratio:.2f}x | | | | |")
PY
