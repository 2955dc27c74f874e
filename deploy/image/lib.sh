# Shell functions and settings the container-image scripts share (deploy/image/build.sh,
# deploy/image/bases.sh, deploy/image/test.sh). Source it after defining `log` and `root`.
# shellcheck shell=bash disable=SC2034,SC2154  # settings for the callers; they define root

# shellcheck source=deploy/lib.sh
source "$root/deploy/lib.sh"

# The image `make image` builds (deploy/docker-compose.yml names it the same).
IMAGE=${SLUICE_IMAGE:-localhost/sluice:local}
# Where the base-image bootstrap keeps its work files (git- and build-context-ignored).
image_cache="$root/.cache/image"

# The official base images the Dockerfile defaults to, and the stand-ins bases.sh makes from
# Debian's packages when those cannot be pulled.
official_build_base=docker.io/library/rust:1.95-bookworm
official_runtime_base=docker.io/library/debian:bookworm-slim
bootstrap_runtime_base=localhost/sluice-bootstrap/debian:bookworm-slim
# The build base is named after the Rust toolchain copied into it (bases.sh).
bootstrap_build_base_repo=localhost/sluice-bootstrap/rust

# Whether cgroups are mounted "hybrid": v1 controllers and a v2 hierarchy that owns some.
cgroup_hybrid() {
  [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" != cgroup2fs ] \
    && [ -n "$(cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null)" ]
}

# Installs podman (Debian's package) and mmdebstrap when missing.
ensure_podman() {
  local want=()
  command -v podman >/dev/null || want+=(podman)
  command -v mmdebstrap >/dev/null || want+=(mmdebstrap)
  command -v curl >/dev/null || want+=(curl)
  # runc: see podman_setup below.
  if cgroup_hybrid && ! command -v runc >/dev/null; then want+=(runc); fi
  if [ ${#want[@]} -gt 0 ]; then apt_install "${want[@]}"; fi
}

# `podman` with the options this machine needs, in the array PODMAN, and the options every
# `podman run`/`podman build` needs, in RUN_OPTS. Both are empty on an ordinary host; each
# workaround below says what it works around and when it applies.
podman_setup() {
  PODMAN=(podman)
  RUN_OPTS=()
  # crun (podman's default runtime on Debian 12, 1.8.1) refuses a cgroup "hybrid" layout —
  # cgroup v1 controllers plus a cgroup v2 hierarchy that owns a controller of its own
  # ("cgroups in hybrid mode not supported, drop all controllers from cgroupv2"), which is
  # what this sandbox's kernel mounts (hugetlb on /sys/fs/cgroup/unified). runc handles it.
  if cgroup_hybrid; then PODMAN+=(--runtime runc); fi
  # Rootful podman gives containers RLIMIT_NOFILE 1048576 and (once any --ulimit is given)
  # RLIMIT_NPROC 1048576; raising a hard limit above the caller's needs CAP_SYS_RESOURCE,
  # which some sandboxes (this one: hard nofile 20000) do not grant, and the runtime then
  # fails with "setrlimit `RLIMIT_NOFILE`: Operation not permitted". Where the caller's hard
  # limit is lower, hand containers the caller's own limits instead.
  local nofile nproc
  nofile=$(ulimit -Hn)
  if [ "$nofile" != unlimited ] && [ "$nofile" -lt 1048576 ]; then
    nproc=$(ulimit -Hu)
    if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi # podman's default
    RUN_OPTS+=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
  fi
}

# Whether the image `$1` is in podman's local storage.
image_present() { "${PODMAN[@]}" image exists "$1"; }
