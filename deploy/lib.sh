# Shell functions the set-up scripts share (deploy/setup.sh, deploy/setup-test-env.sh,
# benches/setup-bench-env.sh, benches/setup-peers-env.sh). Source it after defining
# `log`; `install_venv` reads the caller's `venv`, `stamp` and `requirements`.

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Installs Debian packages, refreshing the package lists only when the first try fails.
apt_install() {
  log "installing Debian's $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null \
    || { as_root apt-get update -q >/dev/null \
         && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null; }
}

# The stamp a virtual environment holding exactly `requirements` carries.
venv_want() { printf '%s\n' "${requirements[@]}" | sha256sum | cut -d' ' -f1; }

# Whether `venv` already holds the pinned `requirements` (its stamp matches).
venv_current() { [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$(venv_want)" ]; }

# Creates `venv` if needed and pip-installs `requirements` unless the stamp says it has them.
install_venv() {
  if venv_current; then return; fi
  if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    local python=${PYTHON:-python3}
    if ! command -v "$python" >/dev/null; then apt_install python3 python3-venv; python=python3; fi
    log "creating $venv"
    rm -rf "$venv"
    if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
      # Debian's python3 lacks ensurepip until python3-venv is installed.
      rm -rf "$venv"
      apt_install python3-venv
      "$python" -m venv "$venv"
    fi
  fi
  log "installing ${requirements[*]} into ${venv#"$root/"}"
  rm -f "$stamp"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "${requirements[@]}"
  venv_want > "$stamp"
}
