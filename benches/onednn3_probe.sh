#!/usr/bin/env bash
# sluice built against oneDNN 3.2 instead of Debian's 2.6, timed against the default build on
# the gated ResNet-50 at batch 1, alternating (not in CI; docs/benchmarks.md, stop 34).
#
# oneDNN 3.2 comes from PyPI's `onednn-cpu-gomp` 2023.2.0 (GNU OpenMP, as Debian's build; the
# newer `onednn` wheels are SYCL/TBB builds), unpacked once into .cache/onednn-3.2; the second
# binary is built into target/onednn3 (a full build, ~7 minutes the first time).
#
#   benches/onednn3_probe.sh [ROUNDS_PER_RUN] [RUNS]     (defaults 12 and 3)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-12}
runs=${2:-3}
prefix=$PWD/.cache/onednn-3.2
if [ ! -f "$prefix/lib/libdnnl.so.3" ]; then
  wheels=$(mktemp -d)
  trap 'rm -rf "$wheels"' EXIT
  python3 -m pip download --quiet --no-deps -d "$wheels" onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0
  for w in "$wheels"/*.whl; do python3 -m zipfile -e "$w" "$wheels/x"; done
  mkdir -p "$prefix/lib"
  cp -r "$wheels"/x/onednn_devel_cpu_gomp-2023.2.0.data/data/include "$prefix/"
  cp "$wheels"/x/onednn_cpu_gomp-2023.2.0.data/data/lib/libdnnl.so.3 "$prefix/lib/"
  ln -sf libdnnl.so.3 "$prefix/lib/libdnnl.so"
fi
cargo build --quiet --release --bin sluice
SLUICE_DNNL_PREFIX=$prefix CARGO_TARGET_DIR=target/onednn3 cargo build --quiet --release --bin sluice
ldd target/onednn3/release/sluice | grep -q "$prefix/lib/libdnnl.so.3" || {
  echo "target/onednn3/release/sluice does not load $prefix/lib/libdnnl.so.3" >&2
  exit 1
}
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'); oneDNN 2.6 (Debian) against 3.2 (PyPI), alternating"
for run in $(seq "$runs"); do
  for build in target/release target/onednn3/release; do
    label=$([ "$build" = target/release ] && echo "2.6" || echo "3.2")
    "$build/sluice" bench engine --models resnet50 --batches 1 --gates channel-slice,channel-select \
      --targets 0.75,0.5,0.3 --rounds "$rounds" | grep '^| resnet50' | sed "s/^/run $run, oneDNN $label: /"
  done
done
