#!/usr/bin/env bash
# Sets up everything the Python-side tests need, idempotently and cached:
#   - .venv/ with pinned tritonclient[all], grpcio-tools (for tests/proto_compat), numpy,
#     pillow, requests, and kubernetes-validate, jsonschema and PyYAML (for
#     deploy/check-kubernetes.sh) (a stamp in .venv/.sluice-stamp skips pip while the
#     pinned set is unchanged);
#   - Triton's perf_analyzer 2.51.0 as .venv/bin/perf_analyzer: the binary comes from the
#     tritonclient==2.51.0 manylinux wheel (the PyPI `perf-analyzer` package is an empty
#     placeholder, and newer wheels need a newer glibc than Debian 12's), libcudart.so.12
#     from the nvidia-cuda-runtime-cu12 wheel, libb64.so.0d from Debian's libb64-0d;
#     the wheels are cached under .cache/test-env/wheels;
#   - Debian's prometheus package, for `prometheus` and `promtool`;
#   - Debian's haproxy, the load balancer in front of three replicas in tests/python/test_fleet.py
#     (only the binary is used; the test starts its own with its own configuration).
# A second run finishes in about a second and downloads nothing.
#
# Usage: deploy/setup-test-env.sh
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
cache="$root/.cache/test-env"
stamp="$venv/.sluice-stamp"
# The pinned Python set; changing it makes the next run re-run pip.
requirements=(
  "tritonclient[all]==2.73.0"
  # The newest grpcio-tools that fits tritonclient 2.73.0's protobuf<7 (it wants
  # protobuf>=6.33.5,<7 and grpcio>=1.81.1); 1.82.0 onwards require protobuf>=7.35.1.
  "grpcio-tools==1.81.1"
  "numpy==2.4.6"
  "pillow==13.0.0"
  "requests==2.34.2"
  # deploy/check-kubernetes.sh: Kubernetes' own schemas (it carries 1.25 to 1.37; the check
  # pins 1.32), and the validator and YAML parser it and the CRD schema check use.
  "kubernetes-validate==1.37.0"
  "jsonschema==4.26.0"
  "PyYAML==6.0.4"
)
pa_version=2.51.0
cudart_version=12.6.77 # the CUDA 12.6 runtime perf_analyzer 2.51.0 (Triton 24.10) was built against
pa_home="$venv/opt/perf_analyzer-$pa_version"

for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
    *) echo "setup-test-env: unknown option '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

log() { echo "setup-test-env: $*" >&2; }

# shellcheck source=deploy/lib.sh
source "$root/deploy/lib.sh"

install_perf_analyzer() {
  if [ ! -f "$pa_home/.complete" ]; then
    [ "$(uname -m)" = x86_64 ] || { log "perf_analyzer $pa_version is only shipped for x86_64"; exit 1; }
    local wheels="$cache/wheels"
    mkdir -p "$wheels"
    if ! ls "$wheels"/tritonclient-"$pa_version"-*manylinux*_x86_64.whl >/dev/null 2>&1 \
       || ! ls "$wheels"/nvidia_cuda_runtime_cu12-"$cudart_version"-*.whl >/dev/null 2>&1; then
      log "downloading tritonclient==$pa_version and nvidia-cuda-runtime-cu12==$cudart_version wheels from PyPI (~15 MB)"
      "$venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-input \
        --no-deps --only-binary=:all: --dest "$wheels" \
        "tritonclient==$pa_version" "nvidia-cuda-runtime-cu12==$cudart_version"
    fi
    log "unpacking perf_analyzer $pa_version into ${pa_home#"$root/"}"
    local tmp="$pa_home.partial"
    rm -rf "$tmp" && mkdir -p "$tmp/bin" "$tmp/lib"
    # Only the two files needed: tritonclient 2.51.0 itself never enters the venv.
    "$venv/bin/python" - "$tmp" "$wheels"/tritonclient-"$pa_version"-*manylinux*_x86_64.whl \
      "$wheels"/nvidia_cuda_runtime_cu12-"$cudart_version"-*.whl <<'EOF'
import os, shutil, sys, zipfile
tmp, pa_wheel, cudart_wheel = sys.argv[1:4]
def extract(wheel, suffix, dest):
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(suffix)]
        if len(names) != 1:
            sys.exit(f"setup-test-env: expected one {suffix} in {wheel}, found {names}")
        with z.open(names[0]) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)
    os.chmod(dest, 0o755)
extract(pa_wheel, "/data/bin/perf_analyzer", os.path.join(tmp, "bin", "perf_analyzer"))
extract(cudart_wheel, "/lib/libcudart.so.12", os.path.join(tmp, "lib", "libcudart.so.12"))
EOF
    rm -rf "$pa_home" && mv "$tmp" "$pa_home"
    touch "$pa_home/.complete"
  fi

  # The remaining system libraries (libb64.so.0d above all) come from Debian.
  if LD_LIBRARY_PATH="$pa_home/lib" ldd "$pa_home/bin/perf_analyzer" | grep -q 'not found'; then
    apt_install libb64-0d libssl3 zlib1g libstdc++6
    if LD_LIBRARY_PATH="$pa_home/lib" ldd "$pa_home/bin/perf_analyzer" | grep 'not found' >&2; then
      log "perf_analyzer still misses the libraries above"; exit 1
    fi
  fi

  # The wrapper finds its files relative to itself, so it survives a moved checkout.
  local wrapper="$venv/bin/perf_analyzer" text
  text=$(cat <<EOF
#!/bin/sh
# Written by deploy/setup-test-env.sh: Triton perf_analyzer $pa_version with the CUDA runtime
# (libcudart.so.12) from the nvidia-cuda-runtime-cu12 wheel beside it.
home=\$(cd "\$(dirname "\$(readlink -f "\$0")")/../opt/perf_analyzer-$pa_version" && pwd)
LD_LIBRARY_PATH="\$home/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
exec "\$home/bin/perf_analyzer" "\$@"
EOF
)
  if [ ! -x "$wrapper" ] || [ "$(cat "$wrapper")" != "$text" ]; then
    printf '%s\n' "$text" > "$wrapper.tmp" && chmod 755 "$wrapper.tmp"
    local got
    got=$("$wrapper.tmp" --version 2>&1) || true
    case "$got" in
      *"Version $pa_version"*) mv "$wrapper.tmp" "$wrapper" ;;
      *) rm -f "$wrapper.tmp"; log "perf_analyzer does not run: $got"; exit 1 ;;
    esac
  fi
}

install_prometheus() {
  if command -v promtool >/dev/null && command -v prometheus >/dev/null; then return; fi
  apt_install prometheus
}

install_haproxy() {
  if command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ]; then return; fi
  apt_install haproxy
}

install_venv
log "python test env ready at .venv (${requirements[*]})"
install_perf_analyzer
log "perf_analyzer $pa_version ready at .venv/bin/perf_analyzer"
install_prometheus
log "prometheus and promtool ready ($(command -v promtool))"
install_haproxy
log "haproxy ready ($(command -v haproxy || echo /usr/sbin/haproxy))"
