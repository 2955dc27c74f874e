#!/usr/bin/env python3
"""sluice against the servers users would pick instead, on the same weights and requests.

Servers (each started alone, driven alone, stopped before the next; rounds alternate the
order): sluice (`target/release/sluice serve`), KServe 0.21's Python model server
(benches/peers/kserve_server.py) and TorchServe 0.12 (benches/peers/ts_handler.py, one
worker, without and with its dynamic batching), all with the same number of intra-op
threads, serving the dense network of:

  fashion  the shipped model (deploy/models/fashion-resnet20), 1x28x28, Fashion-MNIST test
           images; sluice also at its budget 0.5 (the peers have no such knob)
  resnet50 a ResNet-50 made by `sluice model init` (seeded random weights), 3x224x224

Load: one neutral generator, `wrk` (Debian's), at concurrency 1, 8 and 32 for --duration
seconds, each request one image as an Open Inference Protocol JSON body, cycling through
--images different images (the shipped model's test images: a mix, not one easy input).
sluice is also driven with the binary tensor extension (wrk) and over gRPC
(perf_analyzer, from `make test-env`), which the peers' rows do not have.

Before timing, every server's logits for the first images are checked against sluice's
dense output (max |difference| <= 1e-3). Reported per model, protocol and concurrency:
requests/s, p50/p90/p99 latency, errors, the server's RSS after the run (the whole process
tree), medians over --rounds rounds, and sluice's throughput relative to the best peer.

Needs: `make build test-env` and `benches/setup-peers-env.sh` (.cache/peers-venv, Java 17).
Run:   .venv/bin/python benches/peers.py [--rounds 3] [--duration 15] [--models fashion,resnet50]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS_PY = ROOT / ".cache/peers-venv/bin/python"
PEERS_BIN = ROOT / ".cache/peers-venv/bin"
PERF_ANALYZER = ROOT / ".venv/bin/perf_analyzer"
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
MEAN, STD = 0.2860, 0.3530


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen, ok=lambda body: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200 and ok(r.read()):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f} s")


def tree_rss_kib(pid: int) -> int:
    """VmRSS of `pid` and all its descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def fashion_images(n: int) -> list[list[float]]:
    with gzip.open(FASHION) as f:
        _, count, h, w = struct.unpack(">IIII", f.read(16))
        raw = f.read(min(n, count) * h * w)
    return [[(b / 255.0 - MEAN) / STD for b in raw[i * h * w:(i + 1) * h * w]] for i in range(len(raw) // (h * w))]


def random_images(n: int, size: int, seed: int) -> list[list[float]]:
    import random
    rng = random.Random(seed)
    return [[rng.gauss(0.0, 1.0) for _ in range(size)] for _ in range(n)]


def json_body(name: str, dims: list[int], data: list[float], parameters: dict | None = None) -> bytes:
    body = {"inputs": [{"name": name, "datatype": "FP32", "shape": [1, *dims], "data": data}]}
    if parameters:
        body["parameters"] = parameters
    return json.dumps(body).encode()


def binary_body(name: str, dims: list[int], data: list[float], parameters: dict | None = None) -> tuple[bytes, int]:
    header = {"inputs": [{"name": name, "datatype": "FP32", "shape": [1, *dims],
                          "parameters": {"binary_data_size": 4 * len(data)}}],
              "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]}
    if parameters:
        header["parameters"] = parameters
    h = json.dumps(header).encode()
    return h + struct.pack(f"<{len(data)}f", *data), len(h)


WRK_LUA = r"""
local bodies, headers, n, i = {}, {}, 0, 0
function init(args)
  local dir = args[1]
  while true do
    local f = io.open(dir .. "/" .. n .. ".body", "rb")
    if not f then break end
    bodies[n] = f:read("*a"); f:close()
    local h = io.open(dir .. "/" .. n .. ".hdr", "rb")
    headers[n] = h and h:read("*a") or nil
    if h then h:close() end
    n = n + 1
  end
  i = math.random(0, n - 1)
end
function request()
  i = (i + 1) % n
  local hdrs = {["Content-Type"] = "application/json"}
  if headers[i] then
    hdrs["Inference-Header-Content-Length"] = headers[i]
    hdrs["Content-Type"] = "application/octet-stream"
  end
  return wrk.format("POST", wrk.path, hdrs, bodies[i])
end
"""


def write_bodies(folder: Path, bodies: list[tuple[bytes, int | None]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, (body, header_len) in enumerate(bodies):
        (folder / f"{k}.body").write_bytes(body)
        if header_len is not None:
            (folder / f"{k}.hdr").write_text(str(header_len))
    return folder


def run_wrk(url: str, bodies: Path, concurrency: int, duration: float, script: Path) -> dict:
    threads = 1 if concurrency == 1 else 2
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{duration:g}s", "--latency",
                          "--timeout", "30s", "-s", str(script), url, "--", str(bodies)],
                         capture_output=True, text=True, timeout=duration + 60)
    text = out.stdout

    def ms(label: str) -> float | None:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if not m:
            return None
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
    return {"rps": float(rps.group(1)) if rps else 0.0, "p50_ms": ms("50"), "p90_ms": ms("90"),
            "p99_ms": ms("99"), "errors": errors, "raw": text if not rps else None}


def run_perf_analyzer(model: str, port: int, concurrency: int, duration: float, data_json: Path) -> dict:
    out = subprocess.run([str(PERF_ANALYZER), "-m", model, "-i", "grpc", "-u", f"127.0.0.1:{port}",
                          "--concurrency-range", f"{concurrency}:{concurrency}", "--input-data", str(data_json),
                          "--measurement-interval", str(int(duration * 1000 / 3)), "--stability-percentage", "25",
                          "--max-trials", "10", "--percentile", "50", "-f", str(data_json) + f".c{concurrency}.csv"],
                         capture_output=True, text=True, timeout=duration * 6 + 120)
    csv = Path(str(data_json) + f".c{concurrency}.csv")
    rows = csv.read_text().splitlines() if csv.exists() else []
    if out.returncode != 0 or len(rows) < 2:
        return {"rps": 0.0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "errors": 1,
                "raw": out.stdout[-2000:] + out.stderr[-2000:]}
    head, vals = rows[0].split(","), rows[1].split(",")
    col = dict(zip(head, vals))
    us = lambda k: float(col[k]) / 1000.0 if k in col else None  # noqa: E731
    return {"rps": float(col["Inferences/Second"]), "p50_ms": us("p50 latency"), "p90_ms": us("p90 latency"),
            "p99_ms": us("p99 latency"), "errors": 0}


class Server:
    """A started server process; `stop()` ends it and its children."""

    def __init__(self, name: str, argv: list[str], ready_url: str, env: dict | None = None, cwd: Path | None = None,
                 ok=lambda body: True, stop_argv: list[str] | None = None, timeout: float = 180):
        self.name, self.stop_argv = name, stop_argv
        self.log = tempfile.NamedTemporaryFile(prefix=f"peers-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     cwd=cwd or ROOT, start_new_session=True)
        try:
            wait_http(ready_url, timeout, self.proc, ok)
        except Exception:
            self.stop()
            raise

    def rss_kib(self) -> int:
        return tree_rss_kib(self.proc.pid)

    def stop(self) -> None:
        if self.stop_argv:
            subprocess.run(self.stop_argv, capture_output=True, timeout=60,
                           env={**os.environ, "PATH": f"{PEERS_BIN}:{os.environ['PATH']}"})
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def post_json(url: str, body: bytes) -> dict:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def logits_of(answer: dict) -> list[float]:
    for o in answer["outputs"]:
        if o["name"] == "logits":
            return [float(v) for v in o["data"]]
    raise KeyError("no logits output")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=str(ROOT / "target/release/sluice"))
    ap.add_argument("--models", default="fashion,resnet50")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--duration", type=float, default=15, help="seconds per measurement (default: 15)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every server (default: 2)")
    ap.add_argument("--images", type=int, default=64, help="different images cycled through (default: 64)")
    ap.add_argument("--servers", default="sluice,kserve,torchserve,torchserve-batch")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    for need in (PEERS_PY, PERF_ANALYZER, Path(args.binary)):
        if not need.exists():
            print(f"missing {need}: run `make build test-env` and benches/setup-peers-env.sh", file=sys.stderr)
            return 2
    if not shutil.which("wrk"):
        print("missing wrk (Debian's `wrk`): run benches/setup-peers-env.sh", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="sluice-peers-"))
    script = work / "bodies.lua"
    script.write_text(WRK_LUA)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    servers = args.servers.split(",")
    results: list[dict] = []

    for model in args.models.split(","):
        repo = work / f"repo-{model}"
        repo.mkdir()
        if model == "fashion":
            name, dims, arch = "fashion-resnet20", [1, 28, 28], "resnet20"
            shutil.copytree(ROOT / "deploy/models/fashion-resnet20", repo / name)
            # Dense by default, so every server gets the very same bytes; budget 0.5 per request.
            config = repo / name / "config.toml"
            config.write_text(re.sub(r"(?m)^budget = .*$", "", config.read_text()))
            images = fashion_images(args.images)
        else:
            name, dims, arch = "resnet50", [3, 224, 224], "resnet50"
            subprocess.run([args.binary, "model", "init", str(repo / name), "--arch", "resnet50", "--dims", "3x224x224",
                            "--classes", "1000", "--seed", "1", "--max-batch-size", "8"], check=True,
                           stdout=subprocess.DEVNULL)
            images = random_images(min(args.images, 8), 3 * 224 * 224, seed=1)
        folder = repo / name
        variants = {  # protocol → bodies for wrk (gRPC goes through perf_analyzer)
            "json": write_bodies(work / f"{model}-json", [(json_body("input", dims, d), None) for d in images]),
            "binary": write_bodies(work / f"{model}-binary", [binary_body("input", dims, d) for d in images]),
        }
        if model == "fashion":
            variants["json-b0.5"] = write_bodies(work / f"{model}-json-half",
                                                 [(json_body("input", dims, d, {"sluice_budget": 0.5}), None)
                                                  for d in images])
        pa_data = work / f"{model}-pa.json"
        pa_data.write_text(json.dumps({"data": [{"input": {"content": d, "shape": dims}} for d in images]}))
        reference: list[list[float]] = []
        for r in range(args.rounds):
            order = servers[r % len(servers):] + servers[:r % len(servers)]
            for server in order:
                rows = run_server(server, name, arch, folder, work, args, concurrency, variants, script, pa_data,
                                  images, dims, reference)
                for row in rows:
                    row.update(model=model, round=r + 1)
                    results.append(row)
                    print(f"  {model} r{r + 1} {row['server']:17s} {row['protocol']:9s} c={row['concurrency']:<3d} "
                          f"{row['rps']:8.1f} req/s  p50 {fmt(row['p50_ms'])}  p90 {fmt(row['p90_ms'])}  "
                          f"p99 {fmt(row['p99_ms'])} ms  errors {row['errors']}  RSS {row['rss_mib']:.0f} MiB",
                          flush=True)
    summary = summarize(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "summary": summary}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def fmt(v: float | None) -> str:
    return "  -  " if v is None else f"{v:6.2f}"


def run_server(server, name, arch, folder, work, args, concurrency, variants, script, pa_data, images, dims,
               reference) -> list[dict]:
    threads = args.threads
    rows = []
    if server == "sluice":
        http, grpc, metrics = free_port(), free_port(), free_port()
        s = Server("sluice", [args.binary, "serve", "--model-repository", str(folder.parent), "--http-port", str(http),
                              "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--address", "127.0.0.1",
                              "--engine-threads", str(threads)],
                   f"http://127.0.0.1:{http}/v2/health/ready")
        url = f"http://127.0.0.1:{http}/v2/models/{name}/infer"
        protocols = ["json", "binary", "grpc"] + (["json-b0.5"] if "json-b0.5" in variants else [])
    elif server == "kserve":
        http = free_port()
        argv = [str(PEERS_PY), str(ROOT / "benches/peers/kserve_server.py"), "--model-dir", str(folder), "--arch", arch,
                "--name", name, "--http-port", str(http), "--grpc-port", str(free_port()), "--threads", str(threads)]
        if arch == "resnet20":
            argv.append("--channels-last")
        s = Server("kserve", argv, f"http://127.0.0.1:{http}/v2/health/ready", env={"OMP_NUM_THREADS": str(threads)})
        url = f"http://127.0.0.1:{http}/v2/models/{name}/infer"
        protocols = ["json"]
    else:
        s, url = start_torchserve(server, name, arch, folder, work, threads)
        protocols = ["json"]
    try:
        got = [logits_of(post_json(url, json_body("input", dims, d))) for d in images[:4]]
        if not reference:
            reference.extend(got)
        worst = max(abs(a - b) for g, ref in zip(got, reference) for a, b in zip(g, ref))
        if worst > 1e-3:
            raise SystemExit(f"{server}: logits differ from the reference by {worst:.3g} (> 1e-3)")
        for protocol in protocols:
            for c in concurrency:
                if protocol == "grpc":
                    m = run_perf_analyzer(name, int(s_grpc_port(s)), c, args.duration, pa_data)
                else:
                    m = run_wrk(url, variants[protocol], c, args.duration, script)
                rows.append({"server": server, "protocol": protocol, "concurrency": c,
                             **m, "rss_mib": s.rss_kib() / 1024, "logits_max_diff": worst})
    finally:
        s.stop()
    return rows


def s_grpc_port(s: Server) -> int:
    argv = s.proc.args
    return int(argv[argv.index("--grpc-port") + 1])


def start_torchserve(server, name, arch, folder, work, threads) -> tuple[Server, str]:
    store = work / f"ts-{name}"
    if not (store / f"{name}.mar").exists():
        store.mkdir(parents=True, exist_ok=True)
        stage = work / f"ts-stage-{name}"
        stage.mkdir(exist_ok=True)
        shutil.copy(folder / "model.safetensors", stage / "model.safetensors")
        shutil.copy(ROOT / "benches/torchmodels.py", stage / "torchmodels.py")
        (stage / "peer.json").write_text(json.dumps({"arch": arch, "threads": threads,
                                                     "channels_last": arch == "resnet20"}))
        subprocess.run([str(PEERS_BIN / "torch-model-archiver"), "--model-name", name, "--version", "1", "--handler",
                        str(ROOT / "benches/peers/ts_handler.py"), "--extra-files",
                        "torchmodels.py,peer.json,model.safetensors", "--export-path", str(store)],
                       check=True, cwd=stage)
    ports = [free_port() for _ in range(3)]
    batch = 8 if server == "torchserve-batch" else 1
    config = work / f"ts-{name}-{server}.properties"
    models = {name: {"1": {"defaultVersion": True, "marName": f"{name}.mar", "minWorkers": 1, "maxWorkers": 1,
                           "batchSize": batch, "maxBatchDelay": 5 if batch > 1 else 1, "responseTimeout": 120}}}
    config.write_text("\n".join([
        f"inference_address=http://127.0.0.1:{ports[0]}", f"management_address=http://127.0.0.1:{ports[1]}",
        f"metrics_address=http://127.0.0.1:{ports[2]}", "disable_token_authorization=true",
        "install_py_dep_per_model=false", "default_workers_per_model=1", f"models={json.dumps(models)}",
        f"load_models={name}.mar", f"model_store={store}", f"number_of_netty_threads={threads}"]) + "\n")
    env = {"PATH": f"{PEERS_BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": str(threads),
           "LOG_LOCATION": str(work / "ts-logs"), "METRICS_LOCATION": str(work / "ts-logs")}
    # TorchServe refuses to start while its PID file (/tmp/.model_server.pid) names a
    # process; `torchserve --stop` on the way out removes it.
    s = Server(server, [str(PEERS_BIN / "torchserve"), "--start", "--ncs", "--foreground", "--model-store", str(store),
                        "--ts-config", str(config)],
               f"http://127.0.0.1:{ports[1]}/models/{name}", env=env, cwd=work,
               ok=lambda body: b'"READY"' in body, stop_argv=[str(PEERS_BIN / "torchserve"), "--stop"])
    return s, f"http://127.0.0.1:{ports[0]}/predictions/{name}"


def summarize(results: list[dict]) -> list[dict]:
    keys = sorted({(r["model"], r["server"], r["protocol"], r["concurrency"]) for r in results})
    rows = []
    for model, server, protocol, c in keys:
        rs = [r for r in results if (r["model"], r["server"], r["protocol"], r["concurrency"]) == (model, server, protocol, c)]
        med = lambda k: statistics.median([r[k] for r in rs if r[k] is not None]) if any(r[k] is not None for r in rs) else None  # noqa: E731
        rows.append({"model": model, "server": server, "protocol": protocol, "concurrency": c, "rps": med("rps"),
                     "p50_ms": med("p50_ms"), "p90_ms": med("p90_ms"), "p99_ms": med("p99_ms"),
                     "errors": sum(r["errors"] for r in rs), "rss_mib": max(r["rss_mib"] for r in rs)})
    print("\nMedians over rounds (req/s, latency ms, peak RSS MiB over rounds):")
    print(f"{'model':9s} {'server':17s} {'protocol':9s} {'c':>3s} {'req/s':>8s} {'p50':>7s} {'p90':>7s} {'p99':>7s} "
          f"{'errors':>6s} {'RSS':>6s}  sluice ÷ best peer")
    for row in rows:
        peers = [p for p in rows if p["model"] == row["model"] and p["concurrency"] == row["concurrency"]
                 and p["server"] != "sluice"]
        best = max((p["rps"] for p in peers), default=None)
        ratio = f"{row['rps'] / best:.2f}×" if row["server"] == "sluice" and best else ""
        print(f"{row['model']:9s} {row['server']:17s} {row['protocol']:9s} {row['concurrency']:3d} {row['rps']:8.1f} "
              f"{fmt(row['p50_ms'])} {fmt(row['p90_ms'])} {fmt(row['p99_ms'])} {row['errors']:6d} "
              f"{row['rss_mib']:6.0f}  {ratio}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
