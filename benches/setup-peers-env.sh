#!/usr/bin/env bash
# Sets up the peer servers `make bench-peers` compares sluice with (issue 12), idempotently
# and cached; not part of `make test`:
#   - .cache/peers-venv/ with KServe's Python model server (kserve==0.21.0) and TorchServe
#     (torchserve==0.12.0, torch-model-archiver==0.12.0), both serving PyTorch 2.11.0 (the
#     PyPI wheel with its CUDA dependencies, ~4.5 GB; pip's cache shares it with
#     benches/setup-bench-env.sh);
#   - Java 17 (Debian's openjdk-17-jre-headless), which TorchServe's frontend needs, and
#     Debian's wrk, the load generator benches/peers.py drives every server with.
# A stamp (.cache/peers-venv/.sluice-stamp) skips pip while the pinned set is unchanged.
#
# Usage: benches/setup-peers-env.sh        (prints the interpreter's path when done)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.cache/peers-venv"
stamp="$venv/.sluice-stamp"
requirements=(
  "torch==2.11.0"
  "torchvision==0.26.0"
  "kserve==0.21.0"
  "torchserve==0.12.0"
  "torch-model-archiver==0.12.0"
  "safetensors==0.8.0"
  "numpy==2.4.6"
)

for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "setup-peers-env: unknown option '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

log() { echo "setup-peers-env: $*" >&2; }
# shellcheck source=deploy/lib.sh
source "$root/deploy/lib.sh"

if ! command -v java >/dev/null || ! java -version 2>&1 | grep -q '"17\.'; then
  apt_install openjdk-17-jre-headless
fi
command -v wrk >/dev/null || apt_install wrk

if ! venv_current; then
  log "first run: ~4.5 GB, several minutes"
  install_venv
  "$venv/bin/python" -c 'import kserve, torch, ts
from importlib.metadata import version
k, t = version("kserve"), version("torchserve")
print(f"setup-peers-env: torch {torch.__version__}, kserve {k}, torchserve {t}")' >&2
fi
echo "$venv/bin/python"
