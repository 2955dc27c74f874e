#!/usr/bin/env bash
# The training loader against training itself (issue 13's loader target), at the two sizes the
# issue names; not part of `make test` (about 15 minutes on 2 cores):
#   - ResNet-20 at 32x32 on the Fashion-MNIST image folder of the proof (decoded once into
#     memory; every batch is pad-crop + flip),
#   - ResNet-50 at 224x224 on an ImageNet-like folder of JPEGs (500x375, written by
#     imagenet_like.py), streamed from disk (--data-memory-mib 0: every batch is read,
#     decoded, resized and random-resized-cropped), and the same folder decoded once.
# Each is one short epoch of `sluice train`; its epoch log line gives
# loader_images_per_s (batches prepared per second of loader time) and train_images_per_s
# (images the whole epoch consumed per second). Usage:
#   benches/byom/loader.sh [OUT=runs/loader]   (IMAGES32=runs/byom/images THREADS=2)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-$root/runs/loader}
sluice=$root/target/release/sluice
py=$("$root/benches/setup-bench-env.sh")
threads=${THREADS:-2}
images32=${IMAGES32:-$root/runs/byom/images}
mkdir -p "$out"
[ -x "$sluice" ] || (cd "$root" && cargo build --release)
if [ ! -d "$images32/test" ]; then
  "$py" "$root/benches/byom/fashion_imagefolder.py" "$images32"
fi
if [ ! -d "$out/imagenet-like/val" ]; then
  "$py" "$root/benches/byom/imagenet_like.py" "$out/imagenet-like" --train 640 --val 100
fi

epoch() { # name, then sluice train arguments
  local name=$1
  shift
  rm -rf "$out/run-$name"
  "$sluice" train --quiet --epochs 1 --threads "$threads" --out "$out/run-$name" "$@" 2>&1 |
    tee "$out/$name.log" | grep -E "epoch done|decoded|streaming" || true
}
echo "== resnet20 3x32x32, in memory"
epoch r20-32 --arch resnet20 --data "imagefolder:$images32" --dims 3x32x32 --limit 20000
echo "== resnet50 3x224x224, streamed from disk"
epoch r50-224-stream --arch resnet50 --data "imagefolder:$out/imagenet-like" --dims 3x224x224 \
  --batch-size 16 --data-memory-mib 0
echo "== resnet50 3x224x224, decoded once"
epoch r50-224-memory --arch resnet50 --data "imagefolder:$out/imagenet-like" --dims 3x224x224 \
  --batch-size 16
