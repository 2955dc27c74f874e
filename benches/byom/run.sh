#!/usr/bin/env bash
# The bring-your-own-model proof (issue 13), end to end, on data and a network sluice did not
# produce; not part of `make test` (about an hour and a half on 2 cores):
#   1. Fashion-MNIST written as an image folder of 32x32 RGB PNGs (fashion_imagefolder.py);
#   2. a dense CIFAR-style ResNet-20 trained on it *in PyTorch* (train_teacher.py);
#   3. then only sluice: model import -> eval (dense) -> train --init (gate retrofit) ->
#      calibrate -> eval, with the report in OUT/models/retrofit/report.
# Every step is skipped when its output exists, so a rerun resumes. Usage:
#   benches/byom/run.sh [OUT=runs/byom]   (TEACHER_EPOCHS=5 RETROFIT_EPOCHS=3 THREADS=2)
# The Bottleneck variant: a torchvision ResNet-50 on a subset, at the same 32x32 input:
#   ARCH=resnet50 LIMIT=20000 TEACHER_EPOCHS=5 RETROFIT_EPOCHS=1 IMAGES=runs/byom/images \
#     EVAL_LIMIT=1000 benches/byom/run.sh runs/byom-r50      (about 45 minutes)
# (EVAL_LIMIT: calibrate and evaluate on the first N validation / test images.)
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
  "$sluice" train --init "$out/models/teacher" --data "$data" --epochs "${RETROFIT_EPOCHS:-3}" \
    --limit "$limit" --threads "$threads" --out "$out/retrofit-run" --export "$out/models/retrofit" --name retrofit "${resume[@]}"
fi
if [ ! -f "$out/models/retrofit/calibration.json" ]; then
  step "sluice calibrate"
  "$sluice" calibrate "$out/models/retrofit" --data "$data" --threads "$threads" --limit "$eval_limit"
fi
step "sluice eval (the retrofitted model at every budget)"
"$sluice" eval "$out/models/retrofit" --data "$data" --threads "$threads" --limit "$eval_limit" \
  --report "$out/models/retrofit/report"
"$py" - "$out" <<'PY'
import json, sys
out = sys.argv[1]
teacher = json.load(open(f"{out}/teacher.json"))
run = json.load(open(f"{out}/retrofit-run/checkpoint.json"))
print(f"teacher (PyTorch): test accuracy {teacher['test_accuracy']:.4f}, {teacher['epochs']} epochs in {teacher['seconds']:.0f} s")
print(f"retrofit: {run['state']['epoch']} epochs in {run['state']['seconds']:.0f} s")
PY
step "done"
