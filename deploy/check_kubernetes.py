#!/usr/bin/env python3
"""The checks of deploy/check-kubernetes.sh over rendered manifests (`kubectl kustomize`
output, one file per overlay; the file's stem names the overlay in messages).

  core        RENDERED...   core kinds against Kubernetes' own schemas, strict
                            (kubernetes-validate --strict at K8S_VERSION)
  crds        RENDERED...   CRD kinds against the upstream CRDs vendored in
                            deploy/kubernetes/schemas/, unknown fields refused
  adapter     CONFIG        prometheus-adapter's config against its config types, strict
  promql      RULES INDEX CONFIG RENDERED...
                            writes every PromQL expression (adapter rules with their
                            templates filled in, KEDA Prometheus triggers) as a recording
                            rule to RULES for `promtool check rules`, RULES' rule names to
                            INDEX; checks each sluice_* name is documented in docs/metrics.md
  consistency RENDERED...   what no schema knows: SLUICE_* variables and flags `sluice serve`
                            has, threads = CPU request, drain < grace period, names that
                            refer to each other (ports, volumes, ConfigMaps, scale targets),
                            the policy file's models and fields

Each prints its findings and, last, one summary line; exits 1 when it found a problem.
Needs the test venv (deploy/setup-test-env.sh): PyYAML, jsonschema, kubernetes-validate.
"""

import glob
import gzip
import hashlib
import json
import os
import re
import sys
import tomllib

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import referencing
import yaml

K8S_VERSION = "1.32"  # the Kubernetes minor the core kinds are validated against

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S_DIR = os.path.join(ROOT, "deploy", "kubernetes")
SCHEMAS = os.path.join(K8S_DIR, "schemas")

# libyaml's loader when PyYAML has it: the vendored InferenceService CRD is 1.9 MB of YAML.
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

problems = []


def problem(msg):
    problems.append(msg)


def finish(summary):
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} problem(s)")
        sys.exit(1)
    print(summary)


def load_rendered(paths):
    """[(overlay, object)] from kubectl kustomize output files."""
    out = []
    for path in paths:
        overlay = os.path.splitext(os.path.basename(path))[0]
        with open(path) as f:
            for obj in yaml.load_all(f, Loader=Loader):
                if obj:
                    out.append((overlay, obj))
    return out


def kn(obj):
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def kinds(objs):
    """'Deployment x3, Service x6' for a summary line."""
    counts = {}
    for obj in objs:
        counts[obj.get("kind")] = counts.get(obj.get("kind"), 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items()))


def renders(objs):
    return ", ".join(sorted({overlay for overlay, _ in objs}))


def group_of(api_version):
    return api_version.split("/")[0] if "/" in api_version else ""


def json_path(path):
    s = ""
    for p in path:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if s else str(p))
    return s or "(root)"


# ------------------------------------------------------------------ vendored CRDs

def vendored_crds():
    """{(group, kind): (file, {version: schema})} from schemas/, each file's sha256 checked
    against schemas/SHA256SUMS (the upstream file's, uncompressed)."""
    sums = {}
    with open(os.path.join(SCHEMAS, "SHA256SUMS")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                digest, name = line.split()
                sums[name] = digest
    crds = {}
    for path in sorted(glob.glob(os.path.join(SCHEMAS, "*.yaml")) + glob.glob(os.path.join(SCHEMAS, "*.yaml.gz"))):
        name = os.path.basename(path)
        raw = gzip.open(path, "rb").read() if name.endswith(".gz") else open(path, "rb").read()
        upstream = name[:-3] if name.endswith(".gz") else name
        digest = hashlib.sha256(raw).hexdigest()
        if sums.get(upstream) != digest:
            problem(f"schemas/{name}: sha256 {digest} is not the one schemas/SHA256SUMS records "
                    f"for the upstream {upstream} ({sums.get(upstream, 'none')}): vendored files are never edited")
        for doc in yaml.load_all(raw, Loader=Loader):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            versions = {v["name"]: v["schema"]["openAPIV3Schema"] for v in spec["versions"] if v.get("served")}
            crds[(spec["group"], spec["names"]["kind"])] = (name, versions)
    return crds


def strict_schema(schema):
    """The CRD's schema as jsonschema sees it, made as strict as the API server: where an
    object schema lists `properties` and does not say x-kubernetes-preserve-unknown-fields,
    other fields are errors (the API server would prune them silently, so a typo'd field
    would simply vanish). x-kubernetes-int-or-string and nullable become jsonschema types."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    s = {k: strict_schema(v) for k, v in schema.items()}
    if s.get("x-kubernetes-int-or-string") and "type" not in s:
        s["type"] = ["integer", "string"]
    if s.get("nullable") and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    if s.get("x-kubernetes-embedded-resource"):
        props = s.setdefault("properties", {})
        for key in ("apiVersion", "kind"):
            props.setdefault(key, {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if "properties" in s and not s.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in s:
        s["additionalProperties"] = False
    return s


def object_meta_validator():
    """Kubernetes' own ObjectMeta schema (strict), from kubernetes-validate's files: a CRD's
    schema says only `metadata: {type: object}`; the API server checks it as ObjectMeta."""
    version = [v for v in kv_utils.all_versions() if kv_utils.major_minor(v) == K8S_VERSION][-1]
    base = f"kubernetes-json-schema/v{version}-local-strict"
    schema = kv_utils.schema_contents(f"{base}/objectmeta-meta-v1.json", K8S_VERSION)
    defs = kv_utils.schema_contents(f"{base}/_definitions.json", K8S_VERSION)
    registry = referencing.Resource.from_contents(defs) @ (referencing.Resource.from_contents(schema) @ referencing.Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


# KEDA v2.20.2's Prometheus scaler reads these trigger metadata keys (the `keda:"name=..."`
# tags read from triggerMetadata in pkg/scalers/prometheus_scaler.go and
# pkg/scalers/authentication/authentication_types.go); the CRD allows any string map, so a
# misspelt key would pass the schema and be ignored.
KEDA_PROMETHEUS_KEYS = {
    "serverAddress", "query", "queryParameters", "threshold", "activationThreshold",
    "namespace", "customHeaders", "ignoreNullValues", "unsafeSsl", "awsRegion", "timeout",
    "identityOwner", "authModes", "authMode", "apiKey", "method", "keyParamName",
}
KEDA_PROMETHEUS_REQUIRED = {"serverAddress", "query", "threshold"}


def cmd_core(paths):
    objs = load_rendered(paths)
    crd_groups = {g for (g, _k) in vendored_crds()}
    seen = []
    for overlay, obj in objs:
        if group_of(obj.get("apiVersion", "")) in crd_groups:
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            seen.append((overlay, obj))
        except kubernetes_validate.ValidationError as e:
            problem(f"{overlay}: {kn(obj)}: {json_path(e.path)}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problem(f"{overlay}: {kn(obj)} ({obj.get('apiVersion')}): not a Kubernetes {K8S_VERSION} kind, "
                    "and no CRD for it is vendored in deploy/kubernetes/schemas/")
    finish(f"{len(seen)} objects of {renders(seen)} valid against Kubernetes {K8S_VERSION}, strict "
           f"(kubernetes-validate {kubernetes_validate.__version__}): {kinds(o for _, o in seen)}")


def cmd_crds(paths):
    objs = load_rendered(paths)
    crds = vendored_crds()
    meta = object_meta_validator()
    crd_groups = {g for (g, _k) in crds}
    seen = []
    for overlay, obj in objs:
        api = obj.get("apiVersion", "")
        group, version = group_of(api), api.split("/")[-1]
        if group not in crd_groups:
            continue
        where = f"{overlay}: {kn(obj)}"
        entry = crds.get((group, obj.get("kind")))
        if entry is None:
            problem(f"{where}: no vendored CRD for kind {obj.get('kind')} in group {group}")
            continue
        file, versions = entry
        if version not in versions:
            problem(f"{where}: {api} is not a served version of {file} (served: {', '.join(versions)})")
            continue
        body = {k: v for k, v in obj.items() if k != "metadata"}
        validator = jsonschema.Draft4Validator(strict_schema(versions[version]))
        errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
        for e in errors[:20]:
            problem(f"{where}: {json_path(e.absolute_path)}: {e.message}")
        for e in meta.iter_errors(obj.get("metadata", {})):
            problem(f"{where}: metadata.{json_path(e.absolute_path)}: {e.message}")
        if obj.get("kind") == "ScaledObject":
            for i, t in enumerate(obj.get("spec", {}).get("triggers", [])):
                if t.get("type") != "prometheus":
                    continue
                keys = set(t.get("metadata", {}))
                for k in sorted(keys - KEDA_PROMETHEUS_KEYS):
                    problem(f"{where}: spec.triggers[{i}].metadata.{k}: not a key of KEDA's prometheus scaler")
                for k in sorted(KEDA_PROMETHEUS_REQUIRED - keys):
                    problem(f"{where}: spec.triggers[{i}].metadata: {k} is required by KEDA's prometheus scaler")
        if not errors:
            seen.append((overlay, obj))
    finish(f"{len(seen)} objects of {renders(seen)} valid against the vendored CRDs (sha256 checked), "
           f"unknown fields refused: {kinds(o for _, o in seen)}")


# ------------------------------------------------------------------ prometheus-adapter

def load_adapter(path):
    with open(path) as f:
        return yaml.load(f, Loader=Loader)


def cmd_adapter(path):
    with open(os.path.join(SCHEMAS, "prometheus-adapter-config.schema.json")) as f:
        schema = json.load(f)
    config = load_adapter(path)
    name = os.path.relpath(path, ROOT)
    for e in jsonschema.Draft7Validator(schema).iter_errors(config):
        problem(f"{name}: {json_path(e.absolute_path)}: {e.message}")
    rules = (config or {}).get("rules") or []
    for i, r in enumerate(rules):
        if not isinstance(r, dict):
            continue
        overrides = (r.get("resources") or {}).get("overrides") or {}
        if not any(v.get("resource") in ("pod", "pods") for v in overrides.values() if isinstance(v, dict)):
            problem(f"{name}: rules[{i}]: no label maps to the pod resource: the HPA's Pods metrics need one")
        try:
            re.compile(((r.get("name") or {}).get("matches")) or ".*")
        except re.error as e:
            problem(f"{name}: rules[{i}].name.matches: not a regular expression: {e}")
    finish(f"{name}: {len(rules)} rules valid against prometheus-adapter v0.12.0's config types, "
           "unknown keys refused: " + ", ".join(str((r.get('name') or {}).get('as')) for r in rules if isinstance(r, dict)))


# ------------------------------------------------------------------ PromQL

SERIES = re.compile(r"^\s*([a-zA-Z_:][a-zA-Z0-9_:]*)")


def adapter_expressions(config, name):
    """(where, expr) for each rule's seriesQuery and metricsQuery, the adapter's templates
    filled in as it would for two pods of namespace sluice."""
    out = []
    for i, r in enumerate((config or {}).get("rules") or []):
        series_query = r.get("seriesQuery", "")
        out.append((f"{name} rules[{i}].seriesQuery", series_query))
        m = SERIES.match(series_query)
        overrides = (r.get("resources") or {}).get("overrides") or {}
        labels = {label: v.get("resource") for label, v in overrides.items() if isinstance(v, dict)}
        matchers, group_by = [], []
        for label, resource in labels.items():
            if resource in ("pod", "pods"):
                matchers.append(f'{label}=~"sluice-7c9f-a|sluice-7c9f-b"')
                group_by.append(label)
            else:
                matchers.append(f'{label}="sluice"')
        values = {
            "Series": m.group(1) if m else "",
            "LabelMatchers": ",".join(matchers),
            "GroupBy": ",".join(group_by),
        }
        query = r.get("metricsQuery")
        if query is None:
            continue

        def fill(t, values=values, i=i):
            if t.group(1) not in values:
                problem(f"{name} rules[{i}].metricsQuery: unknown template <<.{t.group(1)}>>")
                return t.group(0)
            return values[t.group(1)]

        out.append((f"{name} rules[{i}].metricsQuery", re.sub(r"<<\s*\.(\w+)\s*>>", fill, query)))
    return out


def keda_expressions(objs):
    out = []
    for overlay, obj in objs:
        if obj.get("kind") != "ScaledObject":
            continue
        for i, t in enumerate(obj.get("spec", {}).get("triggers", [])):
            if t.get("type") == "prometheus" and "query" in t.get("metadata", {}):
                out.append((f"{overlay}: {kn(obj)} spec.triggers[{i}].metadata.query", t["metadata"]["query"]))
    return out


def documented_metrics():
    """Series names docs/metrics.md's table lists (histograms as _bucket/_sum/_count)."""
    allowed = set()
    with open(os.path.join(ROOT, "docs", "metrics.md")) as f:
        for line in f:
            cells = [c.strip() for c in line.split("|")]
            if len(cells) < 4 or not cells[1].startswith("`"):
                continue
            for name in re.findall(r"`([a-zA-Z_:][a-zA-Z0-9_:]*)`", cells[1]):
                if cells[2] == "histogram":
                    allowed.update(name + s for s in ("_bucket", "_sum", "_count"))
                else:
                    allowed.add(name)
    return allowed


def cmd_promql(rules_path, index_path, adapter_path, paths):
    exprs = adapter_expressions(load_adapter(adapter_path), os.path.relpath(adapter_path, ROOT))
    exprs += keda_expressions(load_rendered(paths))
    if not exprs:
        problem("no PromQL expressions found")
    allowed = documented_metrics()
    for where, expr in exprs:
        for name in re.findall(r"\bsluice_[a-zA-Z0-9_]+", expr):
            if name not in allowed:
                problem(f"{where}: {name} is not a series sluice exports (docs/metrics.md)")
    with open(rules_path, "w") as rules, open(index_path, "w") as index:
        rules.write("# generated by deploy/check-kubernetes.sh: every PromQL expression of the\n"
                    "# Kubernetes manifests as a recording rule, for promtool check rules\n"
                    "groups:\n  - name: kubernetes-promql\n    rules:\n")
        for n, (where, expr) in enumerate(exprs, 1):
            rules.write(f"      - record: check:k8s_{n}\n        expr: {json.dumps(expr)}\n")
            index.write(f"check:k8s_{n}\t{where}\t{' '.join(expr.split())}\n")
    n_adapter = sum(1 for w, _ in exprs if "rules[" in w)
    finish(f"{len(exprs)} expressions parse ({n_adapter} of prometheus-adapter's rules, templates filled in; "
           f"{len(exprs) - n_adapter} of ScaledObject triggers), their sluice_* series documented")


# ------------------------------------------------------------------ consistency

def serve_flags():
    """{flag: env} of `sluice serve` (src/cli/serve.rs) and the global ones (src/cli/mod.rs)."""
    flags = {}
    for rel in ("src/cli/serve.rs", "src/cli/mod.rs"):
        with open(os.path.join(ROOT, rel)) as f:
            text = f.read()
        for m in re.finditer(r'#\[arg\(([^\]]*?)\)\]\s*(?:///[^\n]*\n\s*)*pub (\w+):', text):
            if "long" not in m.group(1):
                continue
            env = re.search(r'env = "(\w+)"', m.group(1))
            flags["--" + m.group(2).replace("_", "-")] = env.group(1) if env else None
    return flags


def policy_fields():
    """The fields of a gating change (src/control/policy.rs, PolicyChange), which the
    policy file's [models.<name>] tables take."""
    with open(os.path.join(ROOT, "src", "control", "policy.rs")) as f:
        m = re.search(r"pub struct PolicyChange \{(.*?)\n\}", f.read(), re.S)
    return set(re.findall(r"pub (\w+):", m.group(1))) if m else set()


def shipped_models():
    names = set()
    for path in glob.glob(os.path.join(ROOT, "deploy", "models", "*", "config.toml")):
        with open(path, "rb") as f:
            names.add(tomllib.load(f).get("name"))
    return names


def cpu_cores(q):
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def check_container(where, c, pod, flags, by_kind):
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    known_env = {v for v in flags.values() if v} | {"SLUICE_LOG"}
    for name in env:
        if name.startswith("SLUICE_") and name not in known_env:
            problem(f"{where}: env {name}: `sluice serve` reads no such variable (src/cli/serve.rs)")
    args = list(c.get("args", []))
    command = c.get("command") or []
    if [os.path.basename(x) for x in command] == ["sluice"] and args[:1] != ["serve"]:
        problem(f"{where}: args should start with the subcommand `serve`, got {args[:1]}")
    for a in args[1:]:
        flag = a.split("=", 1)[0]
        if flag.startswith("--") and flag not in flags:
            problem(f"{where}: argument {flag}: `sluice serve` has no such flag")
    threads = env.get("SLUICE_ENGINE_THREADS")
    cpu = (c.get("resources", {}).get("requests") or {}).get("cpu")
    if threads is None or cpu is None:
        problem(f"{where}: set both SLUICE_ENGINE_THREADS and a CPU request (threads = CPU request)")
    elif float(threads) != cpu_cores(cpu):
        problem(f"{where}: SLUICE_ENGINE_THREADS={threads} but the CPU request is {cpu}: make them equal")
    shutdown = float(env.get("SLUICE_SHUTDOWN_TIMEOUT") or 30)
    pre_stop = ((c.get("lifecycle") or {}).get("preStop") or {})
    sleep = float((pre_stop.get("sleep") or {}).get("seconds", 0))
    if "exec" in pre_stop:
        cmd = pre_stop["exec"].get("command", [])
        if cmd[:1] == ["sleep"] and len(cmd) == 2:
            sleep = float(cmd[1])
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if sleep + shutdown >= grace:
        problem(f"{where}: preStop {sleep:g} s + SLUICE_SHUTDOWN_TIMEOUT {shutdown:g} s >= terminationGracePeriodSeconds "
                f"{grace} s: the kubelet would kill sluice mid-drain")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {}
    for m in c.get("volumeMounts", []):
        if m["name"] not in volumes:
            problem(f"{where}: volumeMount {m['name']}: no such volume in the pod")
        else:
            mounts[m["mountPath"]] = volumes[m["name"]]
    for v in volumes.values():
        if "configMap" in v and v["configMap"]["name"] not in by_kind.get("ConfigMap", {}):
            problem(f"{where}: volume {v['name']}: ConfigMap {v['configMap']['name']} is not in the render")
        if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in by_kind.get("PersistentVolumeClaim", {}):
            problem(f"{where}: volume {v['name']}: claim {v['persistentVolumeClaim']['claimName']} is not in the render")
    policy = env.get("SLUICE_POLICY_FILE")
    if policy:
        directory, key = os.path.split(policy)
        vol = mounts.get(directory)
        cm = by_kind.get("ConfigMap", {}).get((vol or {}).get("configMap", {}).get("name"))
        if cm is None or key not in cm.get("data", {}):
            problem(f"{where}: SLUICE_POLICY_FILE {policy}: no ConfigMap with key {key} is mounted at {directory}")
        else:
            check_policy(f"{where}: {policy}", cm["data"][key])
    return [p.get("name") for p in c.get("ports", [])]


def check_policy(where, text):
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        problem(f"{where}: not TOML: {e}")
        return
    extra = set(doc) - {"version", "models"}
    if extra:
        problem(f"{where}: unknown keys {sorted(extra)} (version, models)")
    if not isinstance(doc.get("version"), int) or isinstance(doc.get("version"), bool) or doc["version"] < 1:
        problem(f"{where}: version must be a positive integer")
    fields, models = policy_fields(), shipped_models()
    if not fields:
        problem("src/control/policy.rs: PolicyChange's fields not found (has it moved?)")
    for model, policy in (doc.get("models") or {}).items():
        if model not in models:
            problem(f"{where}: [models.{model}] is none of the shipped models ({', '.join(sorted(models))})")
        for k in sorted(set(policy) - fields):
            problem(f"{where}: [models.{model}] {k}: not a field of a gating change ({', '.join(sorted(fields))})")


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def cmd_consistency(paths):
    flags = serve_flags()
    if "--model-repository" not in flags:
        problem("src/cli/serve.rs: the flags of `sluice serve` were not found (has it moved?)")
    by_overlay = {}
    for overlay, obj in load_rendered(paths):
        by_overlay.setdefault(overlay, {}).setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    checked = []
    for overlay, by_kind in sorted(by_overlay.items()):
        pods = []  # (labels, port names)
        for name, d in by_kind.get("Deployment", {}).items():
            pod = d["spec"]["template"]["spec"]
            ports = []
            for c in pod["containers"]:
                ports += check_container(f"{overlay}: Deployment/{name} container {c['name']}", c, pod, flags, by_kind)
            pods.append((d["spec"]["template"]["metadata"].get("labels", {}), ports))
            checked.append(f"{overlay}/Deployment")
        for name, r in by_kind.get("ClusterServingRuntime", {}).items():
            # KServe's pods keep Kubernetes' default 30 s grace period and no preStop.
            for c in r["spec"]["containers"]:
                check_container(f"{overlay}: ClusterServingRuntime/{name} container {c['name']}", c, {}, flags, by_kind)
            checked.append(f"{overlay}/ClusterServingRuntime")
        for name, s in by_kind.get("Service", {}).items():
            matched = [ports for labels, ports in pods if selects(s["spec"].get("selector", {}), labels)]
            if not matched:
                problem(f"{overlay}: Service/{name}: its selector matches no pod template in the render")
            for p in s["spec"].get("ports", []):
                t = p.get("targetPort")
                if isinstance(t, str) and not all(t in ports for ports in matched):
                    problem(f"{overlay}: Service/{name} port {p.get('name')}: no container port named {t}")
        for name, m in by_kind.get("PodMonitor", {}).items():
            matched = [ports for labels, ports in pods if selects(m["spec"]["selector"].get("matchLabels", {}), labels)]
            if not matched:
                problem(f"{overlay}: PodMonitor/{name}: its selector matches no pod template in the render")
            for e in m["spec"].get("podMetricsEndpoints", []):
                if not all(e.get("port") in ports for ports in matched):
                    problem(f"{overlay}: PodMonitor/{name}: no container port named {e.get('port')}")
        for kind in ("HorizontalPodAutoscaler", "ScaledObject"):
            for name, h in by_kind.get(kind, {}).items():
                ref = h["spec"]["scaleTargetRef"]
                if ref.get("kind", "Deployment") != "Deployment" or ref["name"] not in by_kind.get("Deployment", {}):
                    problem(f"{overlay}: {kind}/{name}: scale target {ref.get('kind', 'Deployment')}/{ref['name']} is not in the render")
        if by_kind.get("HorizontalPodAutoscaler") or by_kind.get("ScaledObject"):
            for name, d in by_kind.get("Deployment", {}).items():
                if "replicas" in d["spec"]:
                    problem(f"{overlay}: Deployment/{name}: sets replicas although an autoscaler owns the count "
                            "(every apply would reset it)")
    finish(f"{', '.join(checked)}: SLUICE_* variables and flags exist, threads = CPU request, "
           "preStop + drain < grace, ports/volumes/ConfigMaps/claims/scale targets resolve, policy file fits")


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "core":
        cmd_core(args)
    elif cmd == "crds":
        cmd_crds(args)
    elif cmd == "adapter" and len(args) == 1:
        cmd_adapter(args[0])
    elif cmd == "promql" and len(args) >= 3:
        cmd_promql(args[0], args[1], args[2], args[3:])
    elif cmd == "consistency":
        cmd_consistency(args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
