#!/usr/bin/env bash
# Checks the Kubernetes and KServe manifests in deploy/kubernetes/ offline (no cluster is
# reachable here, and none is needed):
#   1. render          `kubectl kustomize` renders every overlays/*, kserve/ and fill-models/
#   2. core-schemas    the core kinds pass Kubernetes' own schemas, strict: unknown fields
#                      are errors (kubernetes-validate --strict, Kubernetes 1.32)
#   3. crd-schemas     the custom resources (PodMonitor, PrometheusRule, ScaledObject,
#                      ClusterServingRuntime, InferenceService) pass the upstream CRDs'
#                      OpenAPI schemas vendored in deploy/kubernetes/schemas/ (pinned tags,
#                      sources in its README), unknown fields refused as the API server
#                      would prune them; KEDA's Prometheus trigger keys
#   4. adapter-config  the prometheus-adapter rules (components/hpa/prometheus-adapter.yaml)
#                      against the adapter's config types, unknown keys refused
#   5. promql          the adapter rules' queries (templates filled in) and the ScaledObject's
#                      queries parse (promtool check rules, as recording rules) and name only
#                      series docs/metrics.md documents
#   6. prometheusrule  components/monitoring/prometheusrule.yaml is what
#                      deploy/kubernetes/gen-prometheusrule.sh makes of
#                      deploy/prometheus/alerts.yml today, byte for byte
#   7. consistency     what no schema knows: every SLUICE_* variable and flag is one
#                      `sluice serve` has, engine threads = CPU request, preStop + drain <
#                      grace period, Service/PodMonitor ports, volumes, ConfigMaps, claims and
#                      scale targets that exist, the policy file's models and fields
# Needs kubectl (>= 1.27, kustomize v5), promtool (installed with apt-get when missing) and
# the test venv (.venv, deploy/setup-test-env.sh: kubernetes-validate, jsonschema, PyYAML).
# Rendered manifests and generated files go to .cache/kubernetes/ (git-ignored). Prints
# PASS or FAIL per check, with what it checked; exits non-zero when any check fails.
set -euo pipefail

DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$DEPLOY/.." && pwd)"
K8S="$DEPLOY/kubernetes"
GEN="$ROOT/.cache/kubernetes" # regenerated on every run
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
KUBECTL="${KUBECTL:-kubectl}"
HELPER="$DEPLOY/check_kubernetes.py"

failed=0
passed=0

# check NAME COMMAND...: runs COMMAND with its output in a log; on success prints PASS and
# the log's last line (what was checked), on failure FAIL and the whole log.
check() {
  local name=$1
  shift
  local log="$GEN/$name.log"
  if "$@" >"$log" 2>&1; then
    printf 'PASS  %-15s %s\n' "$name" "$(tail -n1 "$log")"
    passed=$((passed + 1))
  else
    printf 'FAIL  %-15s (output below)\n' "$name"
    sed 's/^/      | /' "$log"
    failed=$((failed + 1))
  fi
}

log() { echo "check-kubernetes: $*" >&2; }
# shellcheck source=deploy/lib.sh
source "$DEPLOY/lib.sh" # apt_install

# ---------------------------------------------------------------- tools
if ! command -v "$KUBECTL" >/dev/null; then
  cat >&2 <<'EOF'
check-kubernetes: kubectl not found. It renders the manifests (kubectl kustomize, offline);
Debian's own kubernetes-client (1.20) is too old for kustomize components. Install kubectl
>= 1.27 from the Kubernetes project's apt repository (pkgs.k8s.io) or the Google Cloud SDK,
or point KUBECTL at one.
EOF
  exit 2
fi
command -v promtool >/dev/null || apt_install prometheus
if ! "$PYTHON" -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
  echo "check-kubernetes: $PYTHON lacks kubernetes-validate / jsonschema / PyYAML: run deploy/setup-test-env.sh" >&2
  exit 2
fi
rm -rf "$GEN"
mkdir -p "$GEN/rendered"

# ---------------------------------------------------------------- the checks
# Every overlay, the KServe folder and the model-filling pod; rendered/<name>.yaml for the
# checks after this one.
targets=()
for dir in "$K8S"/overlays/*/ "$K8S"/kserve/ "$K8S"/fill-models/; do
  targets+=("${dir%/}")
done

render() {
  local dir name ok=1 summary=()
  for dir in "${targets[@]}"; do
    name=$(basename "$dir")
    if "$KUBECTL" kustomize "$dir" >"$GEN/rendered/$name.yaml" 2>"$GEN/rendered/$name.err"; then
      summary+=("${dir#"$K8S"/}: $(grep -c '^kind:' "$GEN/rendered/$name.yaml")")
    else
      echo "kubectl kustomize ${dir#"$ROOT"/} failed:"
      cat "$GEN/rendered/$name.err"
      rm -f "$GEN/rendered/$name.yaml"
      ok=0
    fi
  done
  [[ $ok -eq 1 ]] || return 1
  local joined
  joined=$(printf ', %s' "${summary[@]}")
  echo "${#summary[@]} targets rendered ($("$KUBECTL" version --client 2>/dev/null | grep -io 'kustomize version: .*' | tr -d '\n')), objects in each: ${joined:2}"
}

rendered() { compgen -G "$GEN/rendered/*.yaml" || true; }

core_schemas() {
  # shellcheck disable=SC2046
  "$PYTHON" "$HELPER" core $(rendered)
}

crd_schemas() {
  # shellcheck disable=SC2046
  "$PYTHON" "$HELPER" crds $(rendered)
}

adapter_config() {
  "$PYTHON" "$HELPER" adapter "$K8S/components/hpa/prometheus-adapter.yaml"
}

promql() {
  local out rc=0 summary
  # shellcheck disable=SC2046
  summary=$("$PYTHON" "$HELPER" promql "$GEN/promql.rules.yml" "$GEN/promql.index" \
    "$K8S/components/hpa/prometheus-adapter.yaml" $(rendered)) || { echo "$summary"; return 1; }
  out=$(promtool check rules "$GEN/promql.rules.yml" 2>&1) || rc=$?
  echo "$out"
  if [[ $rc -ne 0 ]]; then
    echo "-- failing expressions:"
    grep -o 'check:k8s_[0-9]*' <<<"$out" | sort -u | while read -r rule; do
      grep -P "^$rule\t" "$GEN/promql.index" || true
    done
    return 1
  fi
  echo "promtool $(promtool --version 2>&1 | head -n1 | awk '{print $3}'): $summary"
}

prometheusrule() {
  local file="$K8S/components/monitoring/prometheusrule.yaml"
  "$K8S/gen-prometheusrule.sh" "$GEN/prometheusrule.yaml" || return
  if ! diff -u "$file" "$GEN/prometheusrule.yaml"; then
    echo "${file#"$ROOT"/} is out of date with deploy/prometheus/alerts.yml (diff above: - checked in, + generated)."
    echo "Run deploy/kubernetes/gen-prometheusrule.sh and commit the result."
    return 1
  fi
  echo "${file#"$ROOT"/} = gen-prometheusrule.sh of deploy/prometheus/alerts.yml ($(grep -c -- '- alert:' "$file") alerts), byte for byte"
}

consistency() {
  # shellcheck disable=SC2046
  "$PYTHON" "$HELPER" consistency $(rendered)
}

check render render
check core-schemas core_schemas
check crd-schemas crd_schemas
check adapter-config adapter_config
check promql promql
check prometheusrule prometheusrule
check consistency consistency

if [[ $failed -gt 0 ]]; then
  echo "kubernetes checks: $passed passed, $failed failed"
  exit 1
fi
echo "kubernetes checks: $passed passed, 0 failed"
