#!/usr/bin/env bash
# Runs the container image (`make image-test`; `make image` builds it) and checks it:
#   - it answers /v2/health/live and /v2/health/ready with 200;
#   - sluice is PID 1 (so SIGTERM reaches it directly) and runs as uid/gid 10001, not root;
#   - it serves the README's requests: over HTTP (metadata, deploy/examples/request.json, the
#     PNG) and over gRPC (tritonclient), with the expected class and shapes; metrics on 8002;
#   - the control API answers on the container's loopback (`podman exec ... sluice ctl`),
#     and a gating change persists in the model folder;
#   - the binary's libraries all resolve, every library shipped is one it has loaded, and
#     nothing of the build is left (headers, static libraries, Python, CMake files, ...);
#   - it serves with no network at all (--network none);
#   - a model repository mounted read-only at /models replaces the shipped one, and an admin
#     token (a mounted file) opens the control API on the HTTP port, to holders only;
#   - `podman stop` drains it: requests in flight at SIGTERM are answered, it logs the drain
#     and exits 0 well within the grace period.
# Each check prints PASS or FAIL; the script exits non-zero when one failed.
#
# Usage: deploy/image/test.sh   (SLUICE_IMAGE: the image, default localhost/sluice:local)
set -uo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
log() { echo "image-test: $*" >&2; }
# shellcheck source=deploy/image/lib.sh
source "$root/deploy/image/lib.sh"
ensure_podman
podman_setup

python="$root/.venv/bin/python"
[ -x "$python" ] || { log "needs the test environment: make test-env"; exit 1; }
image_present "$IMAGE" || { log "no image $IMAGE: make image"; exit 1; }

failures=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
check() { # check "what" command...: PASS when the command succeeds
  local what=$1; shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}

tag=sluice-image-test-$$
containers=()
tmp=$(mktemp -d)
cleanup() {
  for c in "${containers[@]}"; do "${PODMAN[@]}" rm -f -t 0 "$c" >/dev/null 2>&1; done
  rm -rf "$tmp"
}
trap cleanup EXIT

# start NAME [podman run options...]: runs the image detached (ports on loopback, chosen by
# the OS), with the stop grace period sluice's drain needs (SLUICE_SHUTDOWN_TIMEOUT 30 s).
start() {
  local name=$1; shift
  containers+=("$name")
  "${PODMAN[@]}" run -d --name "$name" "${RUN_OPTS[@]}" --stop-timeout 40 "$@" "$IMAGE" >/dev/null
}
# port NAME CONTAINER_PORT: the host address a published port landed on.
port() { "${PODMAN[@]}" port "$1" "$2/tcp" | head -n 1; }
# wait_ready URL: until /v2/health/ready answers 200 (60 s at most).
wait_ready() {
  for _ in $(seq 1 120); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$1/v2/health/ready")" = 200 ] && return 0
    sleep 0.5
  done
  return 1
}
status_of() { curl -s -o /dev/null -w '%{http_code}' "$@"; }

echo "== $IMAGE ($("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE") bytes)"
c=$tag-main
start "$c" -p 127.0.0.1::8000 -p 127.0.0.1::8001 -p 127.0.0.1::8002
http="http://$(port "$c" 8000)"
grpc=$(port "$c" 8001)
metrics="http://$(port "$c" 8002)"
if ! wait_ready "$http"; then
  fail "the container became ready"; "${PODMAN[@]}" logs "$c" 2>&1 | tail -n 20; exit 1
fi

echo "== health, user, PID 1"
check "GET /v2/health/live answers 200" test "$(status_of "$http/v2/health/live")" = 200
check "GET /v2/health/ready answers 200" test "$(status_of "$http/v2/health/ready")" = 200
uid=$("${PODMAN[@]}" exec "$c" id -u)
gid=$("${PODMAN[@]}" exec "$c" id -g)
check "runs as a non-root user (podman exec: uid $uid gid $gid)" test "$uid:$gid" = 10001:10001
pid1=$("${PODMAN[@]}" exec "$c" sh -c 'tr "\0" " " < /proc/1/cmdline; echo; grep -E "^(Uid|Gid):" /proc/1/status')
echo "$pid1" | sed 's/^/  PID 1: /'
check "sluice is PID 1 and runs as 10001 (SIGTERM reaches it directly)" \
  bash -c '[[ "$1" == "/usr/local/bin/sluice serve "* ]] && grep -Eq "^Uid:\s+10001\s" <<<"$1"' _ "$pid1"
check "the image's user is numeric 10001:10001" \
  test "$("${PODMAN[@]}" image inspect --format '{{.Config.User}}' "$IMAGE")" = 10001:10001

echo "== the README's requests"
"$python" "$root/deploy/image/check.py" http "$http" || failures=$((failures + 1))
"$python" "$root/deploy/image/check.py" grpc "$grpc" || failures=$((failures + 1))
check "GET :8002/metrics serves sluice's metrics" \
  bash -c 'curl -sf "$1/metrics" | grep -q "^sluice_"' _ "$metrics"

echo "== control API on the container's loopback"
check "podman exec ... sluice ctl gating get" \
  bash -c '"$@" 2>/dev/null | grep -qi budget' _ "${PODMAN[@]}" exec "$c" sluice ctl gating get --model fashion-resnet20
check "podman exec ... sluice ctl gating set --budget 0.7 (persisted to /models/fashion-resnet20/policy.json)" \
  bash -c '"$@" >/dev/null 2>&1' _ "${PODMAN[@]}" exec "$c" sluice ctl gating set --model fashion-resnet20 --budget 0.7
check "the policy file is there and says 0.7" \
  bash -c '"$@" 2>/dev/null | grep -q "0.7"' _ "${PODMAN[@]}" exec "$c" cat /models/fashion-resnet20/policy.json
"${PODMAN[@]}" exec "$c" sluice ctl gating set --model fashion-resnet20 --budget 0.5 >/dev/null 2>&1

echo "== libraries"
ldd_out=$("${PODMAN[@]}" exec "$c" ldd /usr/local/bin/sluice)
check "ldd /usr/local/bin/sluice in the image: every library found" bash -c '! grep -q "not found" <<<"$1"' _ "$ldd_out"
shipped=$("${PODMAN[@]}" exec "$c" sh -c 'ls /opt/libtorch/lib' | sort)
loaded=$("${PODMAN[@]}" exec "$c" sh -c 'grep -o "/[^ ]*\.so[^ ]*" /proc/1/maps | sort -u')
echo "$loaded" | sed 's/^/  loaded: /'
unused=$(for l in $shipped; do grep -q "/opt/libtorch/lib/$l\$" <<<"$loaded" || echo "$l"; done)
check "every library in /opt/libtorch/lib is loaded by sluice (unused: ${unused:-none})" test -z "$unused"

# What the image adds to its base: /opt (libtorch), /usr/local (sluice), /models.
leftovers=$("${PODMAN[@]}" exec "$c" sh -c 'find /opt /usr/local /models \( -name "*.a" -o -name "*.h" -o -name "*.hpp" \
  -o -name "*.py" -o -name "*.cmake" -o -name "libnv*" -o -name "libtorch_python*" -o -name "libcaffe2*" \) -print; \
  ls -d /src /opt/libtorch/include 2>/dev/null' | head -n 20)
check "nothing of the build added: no headers, static libraries, Python or CMake files, CUDA profiler libraries, build folders${leftovers:+: ${leftovers//$'\n'/ }}" \
  test -z "$leftovers"

echo "== no network"
n=$tag-nonet
start "$n" --network none
ok=0
for _ in $(seq 1 60); do
  if "${PODMAN[@]}" exec "$n" sluice ctl gating get --model fashion-resnet20 >/dev/null 2>&1; then ok=1; break; fi
  sleep 0.5
done
check "with --network none it loads the models and answers (loopback control API)" test "$ok" = 1
"${PODMAN[@]}" rm -f -t 0 "$n" >/dev/null 2>&1

echo "== a mounted model repository and an admin token"
mkdir -p "$tmp/models"
cp -r "$root/deploy/models/fashion-resnet20" "$tmp/models/"
printf 'image-test-token\n' > "$tmp/token"
chmod -R a+rX "$tmp"
m=$tag-mounted
start "$m" -p 127.0.0.1::8000 \
  -v "$tmp/models:/models:ro" -e SLUICE_NO_PERSIST_POLICY=true \
  -v "$tmp/token:/run/secrets/sluice-admin-token:ro" -e SLUICE_ADMIN_TOKEN_FILE=/run/secrets/sluice-admin-token
mhttp="http://$(port "$m" 8000)"
if wait_ready "$mhttp"; then
  check "serves the mounted repository's model" test "$(status_of "$mhttp/v2/models/fashion-resnet20")" = 200
  check "the shipped twin (not in the mount) is gone: 404" test "$(status_of "$mhttp/v2/models/fashion-resnet20-image")" = 404
  check "control API on the HTTP port without the token: 401" \
    test "$(status_of "$mhttp/v2/models/fashion-resnet20/gating")" = 401
  check "control API on the HTTP port with the token: 200" \
    test "$(status_of -H 'Authorization: Bearer image-test-token' "$mhttp/v2/models/fashion-resnet20/gating")" = 200
else
  fail "the container with a mounted repository became ready"; "${PODMAN[@]}" logs "$m" 2>&1 | tail -n 20
fi
"${PODMAN[@]}" rm -f -t 0 "$m" >/dev/null 2>&1

echo "== podman stop drains"
"$python" "$root/deploy/image/check.py" drain "$http" \
  --stop "${PODMAN[*]} stop $c" --logs "${PODMAN[*]} logs $c" || failures=$((failures + 1))
state=$("${PODMAN[@]}" inspect --format '{{.State.Status}} {{.State.ExitCode}}' "$c")
check "the container exited with code 0 (state: $state)" test "$state" = "exited 0"

echo
if [ "$failures" = 0 ]; then echo "image-test: all checks passed"; else echo "image-test: $failures check(s) failed"; fi
[ "$failures" = 0 ]
