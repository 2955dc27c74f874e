#!/usr/bin/env bash
# Sets up everything sluice needs to build and run, idempotently and cached:
#   - libtorch 2.11.0 from the PyPI `torch` wheel, as the CPU-only view described in
#     DESIGN.md (default) or the full CUDA wheel (--cuda), under .libtorch/;
#   - oneDNN 2.6 from Debian's `libdnnl-dev` (the library sluice's convolutions run on;
#     libtorch keeps its own copy private);
#   - the Fashion-MNIST dataset from Debian's `dataset-fashion-mnist` (skipped when
#     SLUICE_DATA_DIR points at a folder that already holds the IDX files).
# A second run finishes in about a second and downloads nothing.
#
# Usage: deploy/setup.sh [--cuda] [--no-dataset]
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
torch_version=2.11.0
cudart_version="13.0.96.*"
cupti_version="13.0.85.*"
dest="$root/.libtorch"
variant=cpu
dataset=1

for arg in "$@"; do
  case "$arg" in
    --cuda) variant=cuda ;;
    --no-dataset) dataset=0 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "setup: unknown option '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

log() { echo "setup: $*" >&2; }

python=${PYTHON:-python3}
command -v "$python" >/dev/null || { log "needs python3 with pip to fetch the torch wheel"; exit 1; }

# shellcheck source=deploy/lib.sh
source "$root/deploy/lib.sh" # as_root, apt_install

install_cpu() {
  local view="$dest/cpu" wheels="$dest/wheels"
  if [ -f "$view/.complete" ]; then return; fi
  mkdir -p "$wheels"
  if ! ls "$wheels"/torch-"$torch_version"-*.whl >/dev/null 2>&1 \
     || ! ls "$wheels"/nvidia_cuda_runtime-*.whl >/dev/null 2>&1 \
     || ! ls "$wheels"/nvidia_cuda_cupti-*.whl >/dev/null 2>&1; then
    log "downloading torch==$torch_version and the CUDA runtime wheels from PyPI (~550 MB)"
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$wheels" \
      "torch==$torch_version" "nvidia-cuda-runtime==$cudart_version" "nvidia-cuda-cupti==$cupti_version"
  fi
  log "unpacking the CPU-only libtorch view into $view"
  local tmp="$dest/cpu.partial"
  rm -rf "$tmp" && mkdir -p "$tmp/unpacked" "$tmp/view/lib"
  unzip -q -o "$wheels"/torch-"$torch_version"-*.whl 'torch/lib/*' 'torch/include/*' -d "$tmp/unpacked"
  for w in "$wheels"/nvidia_cuda_runtime-*.whl "$wheels"/nvidia_cuda_cupti-*.whl; do
    unzip -q -o "$w" 'nvidia/*' -d "$tmp/unpacked"
  done
  mv "$tmp/unpacked/torch/include" "$tmp/view/include"
  # Everything but the CUDA parts of libtorch: tch then links torch_cpu + c10 only.
  for f in "$tmp/unpacked/torch/lib/"*; do
    case "$(basename "$f")" in
      libtorch_cuda*|libc10_cuda*|libcaffe2_nvrtc*|libtorch_nvshmem*) ;;
      *) mv "$f" "$tmp/view/lib/" ;;
    esac
  done
  # libtorch_cpu links libcudart/libcupti; its RPATH includes $ORIGIN, so they sit beside it.
  find "$tmp/unpacked/nvidia" -name 'lib*.so*' -exec mv {} "$tmp/view/lib/" \;
  echo "$torch_version" > "$tmp/view/build-version"
  rm -rf "$view" && mv "$tmp/view" "$view" && rm -rf "$tmp"
  touch "$view/.complete"
}

install_cuda() {
  local target="$dest/cuda"
  if [ -f "$target/.complete" ]; then return; fi
  log "installing the full torch==$torch_version wheel with its CUDA dependencies into $target (~4.5 GB)"
  rm -rf "$target"
  "$python" -m pip install --quiet --no-compile --target "$target" "torch==$torch_version"
  echo "$torch_version" > "$target/torch/build-version"
  touch "$target/.complete"
}

select_variant() {
  local link="$dest/current" want="$1" have=""
  [ -L "$link" ] && have=$(readlink "$link")
  if [ "$have" != "$want" ]; then
    ln -sfn "$want" "$link"
    # torch-sys decides at build time whether to link torch_cuda: rebuild it on a switch.
    if [ -n "$have" ] && [ -d "$root/target" ]; then
      log "libtorch variant changed ($have -> $want): cleaning torch-sys's build"
      (cd "$root" && cargo clean -p torch-sys >/dev/null 2>&1 || true)
    fi
  fi
}

if [ "$variant" = cpu ]; then
  install_cpu
  select_variant cpu
else
  install_cuda
  select_variant cuda/torch
fi
log "libtorch $torch_version ($variant) ready at .libtorch/current"

if ! dpkg-query -W -f='${Status}' libdnnl-dev 2>/dev/null | grep -q 'ok installed'; then
  apt_install libdnnl-dev
fi
log "oneDNN $(dpkg-query -W -f='${Version}' libdnnl-dev 2>/dev/null || echo '?') ready"

if [ "$dataset" = 1 ]; then
  data_dir=${SLUICE_DATA_DIR:-/usr/share/datasets/fashion-mnist}
  if [ ! -f "$data_dir/t10k-labels-idx1-ubyte.gz" ]; then
    if [ -n "${SLUICE_DATA_DIR:-}" ]; then
      log "SLUICE_DATA_DIR=$SLUICE_DATA_DIR holds no Fashion-MNIST IDX files"; exit 1
    fi
    apt_install dataset-fashion-mnist
  fi
  log "Fashion-MNIST ready at $data_dir"
fi
