#!/usr/bin/env bash
# The bring-your-own-model proof (issue 13), end to end, on data and a network sluice did not
# produce; not part of `make test` (about 45 minutes on 2 cores, plus about 50 with
# SCRATCH_EPOCHS=8):
#   1. Fashion-MNIST written as an image folder of 32x32 RGB PNGs (fashion_imagefolder.py);
#   2. a dense CIFAR-style ResNet-20 trained on it *in PyTorch* (train_teacher.py);
#   3. then only sluice: model import -> eval (dense) -> train --init (gate retrofit) ->
#      calibrate -> eval, with the report in OUT/models/retrofit/report -> serve, with test
#      images sent over HTTP dense and at budget 0.5 (serve_check.py).
#   4. with SCRATCH_EPOCHS=N, the same gated network trained from scratch on the same folder
#      for N epochs (sluice's own recipe), calibrated and evaluated the same way, for the
#      "retrofit vs from scratch" time comparison (OUT/models/scratch/report).
# Every step is skipped when its output exists, so a rerun resumes. Usage:
#   benches/byom/run.sh [OUT=runs/byom]   (TEACHER_EPOCHS=5 RETROFIT_EPOCHS=2 SCRATCH_EPOCHS=0 THREADS=2
#                                           DISTILL_TEMPERATURE=1)
# The well-trained-teacher comparison of docs/benchmarks.md (about 2.5 hours; about 1.5 with the
# cached teacher of benches/byom/teacher-t15/, copied into OUT first: its README):
#   IMAGES=runs/byom/images TEACHER_EPOCHS=15 RETROFIT_EPOCHS=3 DISTILL_TEMPERATURE=4 \
#     SCRATCH_EPOCHS=11 benches/byom/run.sh runs/byom-t15
# The Bottleneck variant: a torchvision ResNet-50 on a subset, at the same 32x32 input:
#   ARCH=resnet50 LIMIT=20000 TEACHER_EPOCHS=5 RETROFIT_EPOCHS=1 IMAGES=runs/byom/images \
#     EVAL_LIMIT=1000 benches/byom/run.sh runs/byom-r50      (about 45 minutes)
# (EVAL_LIMIT: calibrate and evaluate on the first N validation / test images; SERVE_PORT,
# default 18800: the serve step's HTTP port, with gRPC and metrics on the next two.)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-$root/runs/byom}
sluice=$root/target/release/sluice
py=$("$root/benches/setup-bench-env.sh")
threads=${THREADS:-2}
arch=${ARCH:-resnet20}
limit=${LIMIT:-0}
eval_limit=${EVAL_LIMIT:-0}
images=${IMAGES:-$out/images}
mkdir -p "$out/models"
data="imagefolder:$images"
step() { echo "== $(date -u +%H:%M:%S) $*"; }

[ -x "$sluice" ] || (cd "$root" && cargo build --release)
if [ ! -d "$images/test" ]; then
  step "writing the image folder"
  "$py" "$root/benches/byom/fashion_imagefolder.py" "$images"
fi
if [ ! -f "$out/teacher.json" ]; then
  step "training the dense teacher in PyTorch"
  "$py" "$root/benches/byom/train_teacher.py" "$images" "$out/teacher.safetensors" \
    --epochs "${TEACHER_EPOCHS:-5}" --threads "$threads" --arch "$arch" --limit "$limit"
fi
read -r mean std < <("$py" -c 'import json,sys; t=json.load(open(sys.argv[1])); print(",".join(map(str,t["mean"])), ",".join(map(str,t["std"])))' "$out/teacher.json")
"$py" -c 'import json,sys; print("\n".join(json.load(open(sys.argv[1]))["classes"]))' "$out/teacher.json" > "$out/labels.txt"
if [ ! -d "$out/models/teacher" ]; then
  step "sluice model import"
  "$sluice" model import "$out/teacher.safetensors" "$out/models/teacher" --arch "$arch" --dims 3x32x32 \
    --mean "$mean" --std "$std" --labels "$out/labels.txt"
fi
step "sluice eval (the imported dense network)"
"$sluice" eval "$out/models/teacher" --data "$data" --threads "$threads" --latency-images 0 --limit "$eval_limit"
if [ ! -f "$out/models/retrofit/config.toml" ]; then
  step "sluice train --init (gate retrofit)"
  resume=(); [ -f "$out/retrofit-run/checkpoint.json" ] && resume=(--resume)
  "$sluice" train --init "$out/models/teacher" --data "$data" --epochs "${RETROFIT_EPOCHS:-2}" \
    --distill-temperature "${DISTILL_TEMPERATURE:-1}" \
    --limit "$limit" --threads "$threads" --out "$out/retrofit-run" --export "$out/models/retrofit" --name retrofit "${resume[@]}"
fi
# calibrate (once) and evaluate at every budget the model folder OUT/models/$1 ($2 says which).
calibrate_and_eval() {
  if [ ! -f "$out/models/$1/calibration.json" ]; then
    step "sluice calibrate ($2)"
    "$sluice" calibrate "$out/models/$1" --data "$data" --threads "$threads" --limit "$eval_limit"
  fi
  step "sluice eval ($2 at every budget)"
  "$sluice" eval "$out/models/$1" --data "$data" --threads "$threads" --limit "$eval_limit" \
    --report "$out/models/$1/report"
}
calibrate_and_eval retrofit "the retrofitted model"
step "sluice serve (the folder over HTTP: test images dense and at budget 0.5)"
port=${SERVE_PORT:-18800}
"$sluice" serve --model-repository "$out/models" --http-port "$port" --grpc-port $((port + 1)) \
  --metrics-port $((port + 2)) > "$out/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf --noproxy '*' "http://127.0.0.1:$port/v2/health/ready" >/dev/null && break
  kill -0 $server 2>/dev/null || { cat "$out/serve.log"; exit 1; }
  sleep 0.5
done
"$py" "$root/benches/byom/serve_check.py" "http://127.0.0.1:$port" retrofit "$images/test" "$out/teacher.json"
kill $server; wait $server 2>/dev/null || true; trap - EXIT
scratch_epochs=${SCRATCH_EPOCHS:-0}
if [ "$scratch_epochs" -gt 0 ]; then
  if [ ! -f "$out/models/scratch/config.toml" ]; then
    step "sluice train (the same gated network from scratch, $scratch_epochs epochs)"
    resume=(); [ -f "$out/scratch-run/checkpoint.json" ] && resume=(--resume)
    "$sluice" train --data "$data" --arch "$arch" --dims 3x32x32 --epochs "$scratch_epochs" --limit "$limit" \
      --threads "$threads" --quiet --out "$out/scratch-run" --export "$out/models/scratch" --name scratch "${resume[@]}"
  fi
  calibrate_and_eval scratch "the model trained from scratch"
fi
"$py" - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
teacher = json.load(open(f"{out}/teacher.json"))
run = json.load(open(f"{out}/retrofit-run/checkpoint.json"))
print(f"teacher (PyTorch): test accuracy {teacher['test_accuracy']:.4f}, {teacher['epochs']} epochs in {teacher['seconds']:.0f} s")
print(f"retrofit: {run['state']['epoch']} epochs in {run['state']['seconds']:.0f} s")
if os.path.exists(f"{out}/scratch-run/checkpoint.json"):
    scratch = json.load(open(f"{out}/scratch-run/checkpoint.json"))
    ratio = run["state"]["seconds"] / scratch["state"]["seconds"]
    print(f"from scratch: {scratch['state']['epoch']} epochs in {scratch['state']['seconds']:.0f} s "
          f"(retrofit / from scratch = {ratio:.2f}; compare the two reports' accuracies)")
PY
step "done"
