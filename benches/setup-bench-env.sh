#!/usr/bin/env bash
# Sets up the reference runtimes the engine benchmarks compare sluice with (issue 12), in a
# virtual environment of their own, idempotently and cached; not part of `make test`:
#   - .cache/bench-venv/ with pinned PyTorch 2.11.0 (the PyPI wheel with its CUDA
#     dependencies: `import torch` needs them even on a CPU-only machine, ~4.5 GB),
#     torchvision, ONNX + onnxscript (the exporter), ONNX Runtime, OpenVINO, safetensors;
#   - a stamp (.cache/bench-venv/.sluice-stamp) skips pip while the pinned set is unchanged.
#
# Usage: benches/setup-bench-env.sh        (prints the interpreter's path when done)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.cache/bench-venv"
stamp="$venv/.sluice-stamp"
# The pinned set; changing it makes the next run re-run pip.
requirements=(
  "torch==2.11.0"
  "torchvision==0.26.0"
  "onnx==1.23.2"
  "onnxscript==0.7.2"
  "onnxruntime==1.32.0"
  "openvino==2026.4.1"
  "safetensors==0.8.0"
  "numpy==2.4.6"
)

for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "setup-bench-env: unknown option '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

log() { echo "setup-bench-env: $*" >&2; }
# shellcheck source=deploy/lib.sh
source "$root/deploy/lib.sh"

if ! venv_current; then
  log "first run: ~4.5 GB, several minutes"
  install_venv
  "$venv/bin/python" -c 'import onnxruntime, openvino, torch, torchvision
print(f"setup-bench-env: torch {torch.__version__} (oneDNN: {torch.backends.mkldnn.is_available()}), "
      f"torchvision {torchvision.__version__}, onnxruntime {onnxruntime.__version__}, "
      f"openvino {openvino.__version__}")' >&2
fi
echo "$venv/bin/python"
