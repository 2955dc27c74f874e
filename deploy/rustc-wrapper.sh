#!/bin/sh
# Cargo's rustc wrapper (.cargo/config.toml): refuse to build without the project-local
# libtorch, with one line that says what to run; otherwise run rustc unchanged.
if [ ! -e "$LIBTORCH/lib/libtorch_cpu.so" ]; then
  echo "error: libtorch is not installed at ${LIBTORCH:-.libtorch/current}: run \`make setup\` (deploy/setup.sh) first" >&2
  exit 1
fi
exec "$@"
