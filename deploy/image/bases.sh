#!/usr/bin/env bash
# Makes the two base images the Dockerfile builds on, from Debian's packages, for machines
# that cannot pull the official ones (no registry but Debian's, PyPI's and crates.io's):
#   - localhost/sluice-bootstrap/debian:bookworm-slim stands in for debian:bookworm-slim:
#     Debian 12 "minbase" (Priority: required + apt) with merged /usr, made by mmdebstrap from
#     bookworm, bookworm-updates and bookworm-security, without documentation, man pages or
#     locales (the path-excludes of Debian's official -slim images);
#   - localhost/sluice-bootstrap/rust:<version>-bookworm stands in for rust:<version>-bookworm:
#     the same Debian base with the C/C++ toolchain, git, curl and ca-certificates, and this
#     machine's own Rust toolchain (rustup's, as `rustc --print sysroot` finds it, without its
#     HTML documentation) copied to /usr/local/rustup, with rustup's proxies in
#     /usr/local/cargo/bin and the official image's RUSTUP_HOME, CARGO_HOME, PATH and
#     RUST_VERSION (rustup's servers cannot be reached from here, and Debian 12's rustc,
#     1.63, is far too old).
# Each is a tarball streamed into `podman import`; an image that already exists is kept.
#
# Usage: deploy/image/bases.sh [--refresh]   (--refresh: make both again)
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
log() { echo "image-bases: $*" >&2; }
# shellcheck source=deploy/image/lib.sh
source "$root/deploy/image/lib.sh"

# The Rust toolchain the official build image carries (the Dockerfile's BUILD_BASE default).
min_rust=1.95
mirror=${SLUICE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${SLUICE_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
sources=(
  "deb $mirror bookworm main"
  "deb $mirror bookworm-updates main"
  "deb $security_mirror bookworm-security main"
)
# What Debian's official -slim images leave out (debuerreotype's "slimify" list).
slim=(
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/groff/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/linda/*'
  --dpkgopt='path-exclude=/usr/share/lintian/overrides/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-include=/usr/share/locale/locale.alias'
  --dpkgopt='path-exclude=/usr/share/man/*'
)
# What buildpack-deps:bookworm (under rust:bookworm) provides that a Rust build uses: the C
# and C++ compilers and linker (torch-sys and build.rs compile C++), make, pkg-config, git,
# curl and the CA certificates.
build_packages=ca-certificates,curl,git,gcc,g++,libc6-dev,make,pkg-config,binutils

# mmdebstrap's customize hook for the build base: copies the Rust toolchain into the chroot
# ($2) the way rustup lays it out in the official image.
copy_rust_into() {
  local target=$1 sysroot version toolchain rustup
  sysroot=$(rustc --print sysroot)
  version=$(rustc --version | awk '{print $2}')
  toolchain="$version-$(rustc -vV | sed -n 's/^host: //p')"
  mkdir -p "$target/usr/local/rustup/toolchains/$toolchain" "$target/usr/local/cargo/bin"
  tar -C "$sysroot" --exclude=./share/doc -cf - . | tar -C "$target/usr/local/rustup/toolchains/$toolchain" -xf -
  rustup=$(command -v rustup || true)
  local tools=(cargo cargo-clippy cargo-fmt clippy-driver rustc rustdoc rustfmt)
  if [ -n "$rustup" ]; then
    cp "$(readlink -f "$rustup")" "$target/usr/local/cargo/bin/rustup"
    for t in "${tools[@]}"; do ln -s rustup "$target/usr/local/cargo/bin/$t"; done
    printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\nauto_self_update = "disable"\n\n[overrides]\n' \
      "$toolchain" > "$target/usr/local/rustup/settings.toml"
  else
    for t in "${tools[@]}"; do
      if [ -e "$sysroot/bin/$t" ]; then
        ln -s "/usr/local/rustup/toolchains/$toolchain/bin/$t" "$target/usr/local/cargo/bin/$t"
      fi
    done
  fi
  # The official image's permissions: any user may run the toolchain and use CARGO_HOME.
  chmod -R a+w "$target/usr/local/rustup" "$target/usr/local/cargo"
}
if [ "${1:-}" = --copy-rust-into ]; then copy_rust_into "$2"; exit 0; fi

refresh=0
for arg in "$@"; do
  case "$arg" in
    --refresh) refresh=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "image-bases: unknown option '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

ensure_podman
podman_setup

# The stand-in build base's name, from the toolchain it carries.
rust_version() { rustc --version | awk '{print $2}'; }
build_base_name() { echo "$bootstrap_build_base_repo:$(rust_version)-bookworm"; }

# mmdebstrap ... | podman import: $1 = image name, $2 = what it stands in for, then the
# mmdebstrap options; the --change options come from the caller's `changes` array.
bootstrap() {
  local name=$1 standin=$2; shift 2
  log "making $name (stands in for $standin) from Debian's packages"
  local tar="$image_cache/${name//[\/:]/_}.tar"
  mkdir -p "$image_cache"
  # The tarball goes through a file, not a pipe, so a failed mmdebstrap stops here. /dev is
  # left out: the container runtime provides it.
  if ! mmdebstrap --variant=minbase --format=tar \
         --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
         "${slim[@]}" "$@" bookworm - "${sources[@]}" 2>"$tar.log" \
       | mmtarfilter --path-exclude='/dev/*' > "$tar.partial"; then
    tail -n 30 "$tar.log" >&2; log "mmdebstrap failed (log: ${tar#"$root/"}.log)"; exit 1
  fi
  mv "$tar.partial" "$tar"
  "${PODMAN[@]}" import --quiet "${changes[@]}" \
    --change "LABEL org.opencontainers.image.description=\"Stands in for $standin: made from Debian bookworm packages by deploy/image/bases.sh\"" \
    --change 'CMD ["bash"]' \
    "$tar" "$name" >/dev/null
  rm -f "$tar" "$tar.log"
}

path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
if [ "$refresh" = 1 ] || ! image_present "$bootstrap_runtime_base"; then
  changes=(--change "ENV PATH=$path")
  bootstrap "$bootstrap_runtime_base" "$official_runtime_base"
fi
"${PODMAN[@]}" run --rm --network none "${RUN_OPTS[@]}" "$bootstrap_runtime_base" \
  sh -c 'test "$(cut -d. -f1 /etc/debian_version)" = 12' \
  || { log "$bootstrap_runtime_base does not run"; exit 1; }

command -v rustc >/dev/null || { log "needs a Rust toolchain (rustup) on this machine to copy into the build base"; exit 1; }
if ! printf '%s\n%s\n' "$min_rust" "$(rust_version)" | sort -V -C; then
  log "this machine's Rust is $(rust_version); the build base needs $min_rust or newer"; exit 1
fi
build_base=$(build_base_name)
if [ "$refresh" = 1 ] || ! image_present "$build_base"; then
  changes=(
    --change "ENV RUSTUP_HOME=/usr/local/rustup"
    --change "ENV CARGO_HOME=/usr/local/cargo"
    --change "ENV PATH=/usr/local/cargo/bin:$path"
    --change "ENV RUST_VERSION=$(rust_version)"
  )
  bootstrap "$build_base" "rust:$(rust_version)-bookworm" \
    --include="$build_packages" \
    --customize-hook="\"$root/deploy/image/bases.sh\" --copy-rust-into \"\$1\""
fi
"${PODMAN[@]}" run --rm --network none "${RUN_OPTS[@]}" "$build_base" \
  sh -c 'cargo --version && rustc --version && c++ --version | head -1' >&2 \
  || { log "$build_base does not run cargo"; exit 1; }
log "base images ready: $build_base, $bootstrap_runtime_base"
