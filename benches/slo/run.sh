#!/usr/bin/env bash
# The latency-SLO proof of issue 14 (adaptive budget controller); `make bench-slo`, not in CI.
#
#   1. measures, on a fresh server at budget 1.0 (dense): the batch-1 latency (closed loop,
#      concurrency 1, median) -> SLO p99 = SLO_FACTOR (4) x it; the saturation throughput
#      (closed loop, concurrency SAT_CONCURRENCY = 32, the model's max batch);
#   2. the floor budget: the lowest calibrated budget whose validation accuracy is within
#      0.01 of the budget-1.0 row's (calibration.json);
#   3. drives one seeded Poisson schedule, 0.5x / 2x / 0.5x saturation for PHASE_SECONDS
#      (60) each, against three servers, restarted between them:
#        controller  budget 1.0, then the controller on (p99 <= SLO, at most 1 pt accuracy drop)
#        dense       fixed budget 1.0
#        floor       fixed budget FLOOR
#      with benches/slo/loadgen (open loop, per-request CSV, the live budget polled every
#      100 ms from the admin API);
#   4. benches/slo/report.py: tables per phase, the targets, OUT/slo.svg, OUT/report.json.
#
# Usage: benches/slo/run.sh [OUT=runs/slo]
# Environment (defaults): PHASE_SECONDS=60 SERVERS="controller dense floor" SEED=1
#   SAT_CONCURRENCY=32 MEASURE_SECONDS=10 SLO_FACTOR=4 TIMEOUT_MS=2000 MODEL=fashion-resnet20
#   REPO=deploy/models SLUICE=target/release/sluice BODY=deploy/examples/request.json
#   B1_MS / SATURATION: skip step 1 and use these (ms, req/s).
#   BINARY=1: requests use the binary tensor data extension (0: the JSON body as it is).
#   SERVE_ARGS: extra `sluice serve` flags for every server (e.g. the engine configuration).
#   SERVER_CPUS / LOADGEN_CPUS: pin the servers / the load generator to these CPUs (taskset
#     lists, e.g. SERVER_CPUS=1 LOADGEN_CPUS=0), so the two do not take each other's cores.
# The servers run with --no-persist-policy (nothing is written into the model repository) on
# OS-chosen ports on 127.0.0.1; every server this script starts is stopped when it exits.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
out=${1:-runs/slo}
model=${MODEL:-fashion-resnet20}
repo=${REPO:-deploy/models}
sluice=${SLUICE:-target/release/sluice}
body=${BODY:-deploy/examples/request.json}
phase_seconds=${PHASE_SECONDS:-60}
servers=${SERVERS:-controller dense floor}
seed=${SEED:-1}
sat_concurrency=${SAT_CONCURRENCY:-32}
measure_seconds=${MEASURE_SECONDS:-10}
slo_factor=${SLO_FACTOR:-4}
timeout_ms=${TIMEOUT_MS:-2000}
# Extra `sluice serve` flags for every server (the engine configuration under test).
serve_args=${SERVE_ARGS:-}
loadgen_manifest=benches/slo/loadgen/Cargo.toml
loadgen=benches/slo/loadgen/target/release/loadgen
server_pin=()
[ -n "${SERVER_CPUS:-}" ] && server_pin=(taskset -c "$SERVER_CPUS")
loadgen_pin=()
[ -n "${LOADGEN_CPUS:-}" ] && loadgen_pin=(taskset -c "$LOADGEN_CPUS")
# The load generator, on LOADGEN_CPUS when set.
lg() { "${loadgen_pin[@]}" "$loadgen" "$@"; }
calibration=$repo/$model/calibration.json
mkdir -p "$out/logs"
step() { echo "== $(date -u +%H:%M:%S) $*" >&2; }
die() { echo "bench-slo: $*" >&2; exit 1; }

for s in $servers; do
  case $s in controller | dense | floor) ;; *) die "unknown server set-up '$s' in SERVERS (controller, dense, floor)" ;; esac
done
[ -f "$calibration" ] || die "no calibration table at $calibration"
[ -f "$body" ] || die "no request body at $body"
if [ ! -x "$sluice" ]; then
  step "building sluice"
  cargo build --release
fi
step "building the load generator"
cargo build --release --locked --quiet --manifest-path "$loadgen_manifest"

# The request: BINARY=1 (default) sends the tensor with the binary data extension, as
# perf_analyzer and tritonclient do by default (a 3 KB body instead of 10 KB of JSON
# numbers to parse); BINARY=0 sends $body as it is.
if [ "${BINARY:-1}" = 1 ]; then
  header_length=$(python3 - "$body" "$out/body.bin" <<'PY'
import json, struct, sys
request = json.load(open(sys.argv[1]))
tensor = request["inputs"][0]
values = tensor.pop("data")
while values and isinstance(values[0], list):
    values = [v for row in values for v in row]
tensor.setdefault("parameters", {})["binary_data_size"] = 4 * len(values)
header = json.dumps(request, separators=(",", ":")).encode()
open(sys.argv[2], "wb").write(header + struct.pack(f"<{len(values)}f", *values))
print(len(header))
PY
)
  body_args=(--body "$out/body.bin" --binary-header-length "$header_length")
else
  body_args=(--body "$body")
fi

server=""
stop_server() {
  if [ -n "$server" ]; then
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    server=""
  fi
}
trap stop_server EXIT

# start_server NAME: a fresh server; sets $http and $admin (base URLs).
start_server() {
  local log=$out/logs/$1
  "${server_pin[@]}" "$sluice" serve --model-repository "$repo" --address 127.0.0.1 --http-port 0 --grpc-port 0 \
    --metrics-port 0 --admin-port 0 --no-persist-policy $serve_args >"$log.out" 2>"$log.err" &
  server=$!
  local deadline=$((SECONDS + 120))
  until grep -q "sluice ready" "$log.out" 2>/dev/null; do
    kill -0 "$server" 2>/dev/null || { tail -20 "$log.err" >&2; die "the server ($1) exited while starting"; }
    [ "$SECONDS" -lt "$deadline" ] || die "the server ($1) was not ready within 120 s ($log.err)"
    sleep 0.2
  done
  local line
  line=$(grep -m1 "sluice ready" "$log.out")
  http=http://$(grep -o 'http=[^ ]*' <<<"$line" | cut -d= -f2)
  admin=http://$(grep -o 'admin=[^ ]*' <<<"$line" | cut -d= -f2)
  [ "$admin" != http://none ] || die "the server has no admin listener"
  until curl -sf -o /dev/null "$http/v2/health/ready"; do
    [ "$SECONDS" -lt "$deadline" ] || die "$http/v2/health/ready did not answer 200 within 120 s"
    sleep 0.2
  done
}

# admin_put PATH JSON: PUT on the admin API; fails the script on anything but 200.
admin_put() {
  local code
  code=$(curl -s -o "$out/logs/admin.response" -w '%{http_code}' -X PUT -H 'content-type: application/json' \
    --data "$2" "$admin$1") || code=000
  if [ "$code" != 200 ]; then
    echo "bench-slo: PUT $admin$1 $2 answered HTTP $code: $(head -c 500 "$out/logs/admin.response" 2>/dev/null)" >&2
    return 1
  fi
}

json_field() { # FILE EXPR: a value of loadgen's JSON summary `s`, e.g. 's["latency_ms"]["p50"]'
  python3 -c "import json,sys; s = json.load(open(sys.argv[1])); print($2)" "$1"
}

# 1. The dense batch-1 latency and saturation throughput.
if [ -n "${B1_MS:-}" ] && [ -n "${SATURATION:-}" ]; then
  b1_ms=$B1_MS
  saturation=$SATURATION
  step "using B1_MS=$b1_ms SATURATION=$saturation"
else
  step "measuring the dense model (budget 1.0): batch-1 latency and saturation throughput"
  start_server measure
  admin_put "/v2/models/$model/gating" '{"budget":1.0}'
  lg --url "$http" --model "$model" "${body_args[@]}" --timeout-ms "$timeout_ms" \
    --concurrency 1 --warmup 2 --seconds "$measure_seconds" --out "$out/measure-b1.csv" >"$out/measure-b1.json"
  lg --url "$http" --model "$model" "${body_args[@]}" --timeout-ms "$timeout_ms" \
    --concurrency "$sat_concurrency" --warmup 2 --seconds "$measure_seconds" \
    --out "$out/measure-saturation.csv" >"$out/measure-saturation.json"
  stop_server
  for m in b1 saturation; do
    bad=$(json_field "$out/measure-$m.json" 's["requests"] - s["ok"]')
    [ "$bad" = 0 ] || die "$bad requests failed while measuring ($out/measure-$m.json)"
  done
  b1_ms=$(json_field "$out/measure-b1.json" 's["latency_ms"]["p50"]')
  saturation=$(json_field "$out/measure-saturation.json" 's["ok_per_s"]')
fi
slo_ms=$(python3 -c "import sys; print(round(float(sys.argv[1]) * float(sys.argv[2]), 3))" "$b1_ms" "$slo_factor")

# 2. The floor budget.
floor=$(python3 - "$calibration" <<'PY'
import json, sys
rows = sorted(json.load(open(sys.argv[1]))["budgets"], key=lambda r: r["budget"])
dense = next(r for r in rows if abs(r["budget"] - 1.0) < 1e-9)["validation_accuracy"]
print(next(r["budget"] for r in rows if r["validation_accuracy"] >= dense - 0.01 - 1e-12))
PY
)
low=$(python3 -c "import sys; print(max(1, round(0.5 * float(sys.argv[1]))))" "$saturation")
high=$(python3 -c "import sys; print(max(1, round(2.0 * float(sys.argv[1]))))" "$saturation")
phases="$low:$phase_seconds,$high:$phase_seconds,$low:$phase_seconds"
step "dense batch-1 latency $b1_ms ms -> SLO p99 $slo_ms ms; saturation $saturation req/s; floor budget $floor"
step "schedule: $phases (req/s:s), seed $seed"

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- 2>/dev/null || commit="$commit+dirty"
M_MODEL=$model M_CALIBRATION=$calibration M_B1=$b1_ms M_FACTOR=$slo_factor M_SLO=$slo_ms \
M_SAT=$saturation M_SATC=$sat_concurrency M_FLOOR=$floor M_SEED=$seed M_LOW=$low M_HIGH=$high \
M_SECONDS=$phase_seconds M_SERVERS=$servers M_TIMEOUT=$timeout_ms M_NPROC=$(nproc) M_COMMIT=$commit \
M_MACHINE=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1) \
M_SERVE_ARGS=$serve_args M_SERVER_CPUS=${SERVER_CPUS:-} M_LOADGEN_CPUS=${LOADGEN_CPUS:-} \
python3 - "$out/meta.json" <<'PY'
import json, os, sys
e = os.environ
phase = lambda label, rate: {"label": label, "rate": float(rate), "seconds": float(e["M_SECONDS"])}
json.dump({
    "model": e["M_MODEL"], "calibration": e["M_CALIBRATION"], "b1_ms": float(e["M_B1"]),
    "slo_factor": float(e["M_FACTOR"]), "slo_ms": float(e["M_SLO"]),
    "saturation_per_s": float(e["M_SAT"]), "sat_concurrency": int(e["M_SATC"]),
    "floor": float(e["M_FLOOR"]), "operator_budget": 1.0, "seed": int(e["M_SEED"]),
    "phases": [phase("0.5×", e["M_LOW"]), phase("2×", e["M_HIGH"]), phase("0.5×", e["M_LOW"])],
    "servers": e["M_SERVERS"].split(), "timeout_ms": int(e["M_TIMEOUT"]),
    "machine": e["M_MACHINE"].strip() or "unknown", "nproc": int(e["M_NPROC"]), "commit": e["M_COMMIT"],
    "serve_args": e["M_SERVE_ARGS"], "server_cpus": e["M_SERVER_CPUS"], "loadgen_cpus": e["M_LOADGEN_CPUS"],
}, open(sys.argv[1], "w"), indent=1)
PY

# 3. The same schedule against each server set-up.
for s in $servers; do
  step "server '$s'"
  rm -f "$out/$s.requests.csv" "$out/$s.budget.csv" "$out/$s.summary.json"
  start_server "$s"
  case $s in
    controller | dense) admin_put "/v2/models/$model/gating" '{"budget":1.0}' ;;
    floor) admin_put "/v2/models/$model/gating" "{\"budget\":$floor}" ;;
  esac
  # Warm connections and caches at a light load (not recorded), before the controller starts
  # measuring.
  lg --url "$http" --model "$model" "${body_args[@]}" --concurrency 1 --seconds 2 >/dev/null
  if [ "$s" = controller ]; then
    admin_put "/v2/models/$model/gating/controller" \
      "{\"enabled\":true,\"percentile\":\"p99\",\"target_ms\":$slo_ms,\"max_accuracy_drop\":1.0}" \
      || die "could not turn the budget controller on (does this build have PUT /v2/models/{model}/gating/controller? SERVERS=\"dense floor\" skips it)"
  fi
  lg --url "$http" --admin "$admin" --model "$model" "${body_args[@]}" --timeout-ms "$timeout_ms" \
    --phases "$phases" --seed "$seed" --out "$out/$s.requests.csv" --budget-out "$out/$s.budget.csv" \
    >"$out/$s.summary.json"
  curl -sf "$admin/v2/models/$model/gating" >"$out/logs/$s.gating-end.json" || true
  stop_server
done

# 4. The report.
step "report"
python3 benches/slo/report.py "$out" | tee "$out/report.md"
