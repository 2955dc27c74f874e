#!/usr/bin/env bash
# Builds the container image (`make image`) with podman from the repository's Dockerfile,
# tagged localhost/sluice:local (SLUICE_IMAGE to change it). Installs podman (Debian's
# package) when missing.
#
# Base images (SLUICE_BASES): `official` builds on rust:1.95-bookworm and
# debian:bookworm-slim from Docker Hub; `bootstrap` on the equivalents deploy/image/bases.sh
# makes from Debian's packages; `auto` (the default) takes the official ones when they are
# here or can be pulled, and bootstraps otherwise. SLUICE_BUILD_BASE / SLUICE_RUNTIME_BASE
# name any others.
#
# Caches: the host's .libtorch/wheels (deploy/setup.sh's download of the pinned torch wheel)
# is mounted into the build, so a set-up checkout downloads no libtorch and one that is not
# set up downloads it there once; crates and the cargo target folder are build cache mounts.
#
# Usage: deploy/image/build.sh [extra podman build options]
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
log() { echo "image: $*" >&2; }
# shellcheck source=deploy/image/lib.sh
source "$root/deploy/image/lib.sh"

ensure_podman
podman_setup
mkdir -p "$root/.libtorch/wheels" "$image_cache"

bases=${SLUICE_BASES:-auto}
build_base=${SLUICE_BUILD_BASE:-}
runtime_base=${SLUICE_RUNTIME_BASE:-}
if [ -z "$build_base" ] || [ -z "$runtime_base" ]; then
  case "$bases" in
    official|bootstrap) ;;
    auto)
      bases=official
      for b in "$official_build_base" "$official_runtime_base"; do
        if image_present "$b"; then continue; fi
        # Ask the registry first (any HTTP answer will do; 10 s at most), so that a machine
        # whose firewall drops the connection does not wait for `podman pull` to give up.
        if ! curl -s -o /dev/null -m 10 https://registry-1.docker.io/v2/ 2>/dev/null; then
          log "cannot reach Docker Hub for $b: bootstrapping the base images from Debian's packages"
          bases=bootstrap
          break
        fi
        if ! "${PODMAN[@]}" pull --quiet "$b" >/dev/null 2>"$image_cache/pull.log"; then
          log "cannot pull $b ($(tail -n 1 "$image_cache/pull.log")): bootstrapping the base images from Debian's packages"
          bases=bootstrap
          break
        fi
      done
      rm -f "$image_cache/pull.log"
      ;;
    *) log "SLUICE_BASES must be auto, official or bootstrap, not '$bases'"; exit 2 ;;
  esac
  if [ "$bases" = bootstrap ]; then
    "$root/deploy/image/bases.sh"
    build_base=${build_base:-$bootstrap_build_base_repo:$(rustc --version | awk '{print $2}')-bookworm}
    runtime_base=${runtime_base:-$bootstrap_runtime_base}
  else
    build_base=${build_base:-$official_build_base}
    runtime_base=${runtime_base:-$official_runtime_base}
  fi
fi

build_opts=()
# The build fetches crates (crates.io) and, on a checkout that is not set up, the torch wheel
# (PyPI) over HTTPS: it trusts the CAs this machine trusts, mounted for the build only (not
# in any layer). On this machine that is what lets it through the sandbox's TLS-intercepting
# egress proxy, whose CA is in the host's bundle and in no image's.
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  build_opts+=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
fi
log "building $IMAGE on $build_base and $runtime_base"
"${PODMAN[@]}" build "${RUN_OPTS[@]}" "${build_opts[@]}" \
  --build-arg "BUILD_BASE=$build_base" \
  --build-arg "RUNTIME_BASE=$runtime_base" \
  --volume "$root/.libtorch/wheels:/src/.libtorch/wheels" \
  --tag "$IMAGE" \
  --file "$root/Dockerfile" \
  "$@" "$root"

size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
log "built $IMAGE: $size bytes ($((size / 1000000)) MB)"
"${PODMAN[@]}" images "$IMAGE" >&2
