#!/usr/bin/env python3
"""Soak: 30 minutes at saturation over HTTP and gRPC with a mix of valid, invalid, image and
over-limit requests, live policy changes every 10 s, and SIGTERM at the end.

Target (`make soak`, not in CI): zero 5xx, every accepted request answered, RSS growth after
the first minute < 5%, open file descriptors flat; reports the figures and a plot of RSS over
time.

What it does: starts `target/release/sluice serve` (deploy/models, OS-chosen ports,
127.0.0.1, default limits), then --threads client threads (default 8, spread over --procs
processes) send back to back, for --duration seconds (default 1800), a weighted mix of:

  valid:   HTTP JSON (deploy/examples/request.json), the same with a per-request
           `sluice_budget` (0.3/0.5/0.8/1.0), HTTP binary tensor (Triton's extension),
           gRPC ModelInfer (raw_input_contents; some with a sluice_budget parameter),
           PNG to fashion-resnet20-image (`Inference-Header-Content-Length: 0`);
  invalid: malformed JSON, wrong shape, unknown model, a budget outside the calibrated range
           (expect 400/404), gRPC wrong shape / unknown model (INVALID_ARGUMENT / NOT_FOUND);
  over-limit: one HTTP body of 64 MiB + 1 (expect 413) every --http-overlimit-every s and one
           gRPC message of 256 MiB + 1 KiB (expect RESOURCE_EXHAUSTED) every
           --grpc-overlimit-every s, each from one designated thread.

Every --policy-period s (default 10) the live policy of both models is PATCHed on the admin
port, alternating budgets 0.5/0.8/1.0. VmRSS, VmHWM and the open fds of the server are
sampled every second into DIR/rss.csv. At the end SIGTERM is sent while the clients keep
sending: a request whose bytes were all sent before the signal must get an answer (any
HTTP status or gRPC status from the server, not a reset); requests sent after it are counted
separately (503 / refused / reset are fine there). The drain time and exit code are reported.

Outputs in --out DIR (default runs/soak/): rss.csv, rss.svg (RSS and fds over time), the
server log, summary.json (also to --json when given).

Run (from the repository root, after `make build test-env`):
    make soak
    .venv/bin/python benches/soak.py --duration 60 [--threads 8] [--out runs/soak] [--json s.json]

Exit code: 0 when every target passed, 1 when one failed or the server crashed, 2 on a
harness error.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import struct
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.dont_write_bytecode = True  # no benches/__pycache__ from importing loadlib
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loadlib as L  # noqa: E402

TENSOR_INFER = f"/v2/models/{L.TENSOR_MODEL}/infer"
IMAGE_INFER = f"/v2/models/{L.IMAGE_MODEL}/infer"
JSON_HDR = {"Content-Type": "application/json"}

# kind -> (weight, expected outcomes)
KINDS = {
    "http_json": (20, {"200"}),
    "http_json_budget": (10, {"200"}),
    "http_binary": (15, {"200"}),
    "grpc_valid": (15, {"OK"}),
    "grpc_valid_budget": (5, {"OK"}),
    "image_png": (10, {"200"}),
    "invalid_json": (5, {"400"}),
    "wrong_shape": (5, {"400"}),
    "unknown_model": (4, {"404"}),
    "bad_budget": (3, {"400"}),
    "grpc_wrong_shape": (4, {"INVALID_ARGUMENT"}),
    "grpc_unknown_model": (4, {"NOT_FOUND"}),
    "http_overlimit": (0, {"413"}),
    "grpc_overlimit": (0, {"RESOURCE_EXHAUSTED"}),
}
GRPC_SERVER_ERRORS = {"INTERNAL", "UNKNOWN", "DATA_LOSS", "UNAVAILABLE"}


# --------------------------------------------------------------------------------------------
# Client processes


class Payloads:
    def __init__(self, http_limit: int, grpc_limit: int):
        from tritonclient.grpc import service_pb2
        self.pb = service_pb2
        base = json.loads(L.load_request_json())
        self.x = struct.pack("<784f", *base["inputs"][0]["data"])
        self.json = json.dumps(base).encode()
        self.json_budget = {}
        for b in (0.3, 0.5, 0.8, 1.0):
            d = dict(base)
            d["parameters"] = {"sluice_budget": b}
            self.json_budget[b] = json.dumps(d).encode()
        d = dict(base)
        d["parameters"] = {"sluice_budget": 0.01}
        self.bad_budget = json.dumps(d).encode()
        hdr = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28],
                                      "parameters": {"binary_data_size": len(self.x)}}],
                          "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
        self.binary = hdr + self.x
        self.binary_hdr_len = len(hdr)
        self.invalid = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,28,28],"data":[0,0,'
        d = dict(base)
        d["inputs"] = [dict(base["inputs"][0], shape=[1, 1, 28, 27])]
        self.wrong_shape = json.dumps(d).encode()
        self.png = L.example_png()
        self.http_limit, self.grpc_limit = http_limit, grpc_limit
        self._http_over = None
        self._grpc_over = None

    def grpc_request(self, model=L.TENSOR_MODEL, shape=(1, 1, 28, 28), budget=None):
        req = self.pb.ModelInferRequest(model_name=model)
        t = req.inputs.add()
        t.name, t.datatype = "input", "FP32"
        t.shape.extend(shape)
        n = 1
        for s in shape:
            n *= s
        req.raw_input_contents.append(self.x[: 4 * n] if n <= 784 else self.x + bytes(4 * (n - 784)))
        if budget is not None:
            req.parameters["sluice_budget"].double_param = budget
        return req

    def http_over(self) -> bytes:
        if self._http_over is None:
            self._http_over = bytes(self.http_limit + 1)
        return self._http_over

    def grpc_over(self) -> bytes:
        if self._grpc_over is None:
            req = self.grpc_request()
            req.raw_input_contents[0] = bytes(self.grpc_limit + 1024)
            self._grpc_over = req.SerializeToString()
        return self._grpc_over


def worker_process(proc_idx: int, thread_ids: list[int], ports: dict, sig_t, stop, out, cfg: dict):
    L.child_process_init()
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    pay = Payloads(cfg["http_limit"], cfg["grpc_limit"])
    lock = threading.Lock()
    counts: Counter = Counter()          # (bucket, kind, outcome) -> n
    unanswered_samples: list = []
    odd_samples: list = []               # unexpected outcomes before SIGTERM, with their times
    latencies: dict[str, list] = {}
    kinds = [k for k, (w, _) in KINDS.items() if w > 0]
    weights = [KINDS[k][0] for k in kinds]

    def record(kind, outcome, answered, t_start, t_sent, elapsed, detail=""):
        sig = sig_t.value
        sent_at = t_sent if t_sent is not None else t_start
        if sig == 0.0 or (t_sent is not None and sent_at < sig):
            bucket = "run"
        else:
            bucket = "after_sigterm"
        with lock:
            counts[(bucket, kind, outcome)] += 1
            if not answered and bucket == "run":
                counts[("unanswered", kind, outcome)] += 1
                if len(unanswered_samples) < 50:
                    unanswered_samples.append({"kind": kind, "outcome": outcome, "detail": detail[:200],
                                               "t_start": t_start, "t_sent": t_sent, "sig": sig})
            if answered and bucket == "run" and outcome in KINDS[kind][1]:
                latencies.setdefault(kind, []).append(elapsed)
            elif bucket == "run" and len(odd_samples) < 100:
                odd_samples.append({"kind": kind, "outcome": outcome, "detail": detail[:200],
                                    "t_start": t_start, "t_sent": t_sent})

    def http_outcome(r: L.HttpResult) -> tuple[str, bool]:
        if r.status is None:
            return r.outcome(), False
        o = str(r.status)
        if r.status == 503 and b"shutting down" in r.body:
            o = "503 shutting down"
        if r.early:
            o += " (answered before the body was sent)"
        return o, True

    def thread_main(tid: int):
        rnd = random.Random(tid * 7919 + 1)
        ka = L.KeepAlive(ports["http"], timeout=cfg["timeout"])
        channel = grpc.insecure_channel(f"{L.HOST}:{ports['grpc']}", options=[
            ("grpc.max_send_message_length", 2 ** 31 - 1), ("grpc.max_receive_message_length", 2 ** 31 - 1)])
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        raw_infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                        request_serializer=lambda b: b,
                                        response_deserializer=service_pb2.ModelInferResponse.FromString)
        next_http_over = time.monotonic() + 3.0 if tid == 0 else float("inf")
        grpc_over_tid = 1 if cfg["threads"] > 1 else 0
        next_grpc_over = time.monotonic() + 5.0 if tid == grpc_over_tid else float("inf")
        prev_http = "-"  # the previous request on the current keep-alive connection
        grpc_req = {"valid": pay.grpc_request(), "budget": pay.grpc_request(budget=0.5),
                    "shape": pay.grpc_request(shape=(1, 1, 28, 27)), "model": pay.grpc_request(model="no-such-model")}
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_http_over:
                kind = "http_overlimit"
                next_http_over = now + cfg["http_over_every"]
            elif now >= next_grpc_over:
                kind = "grpc_overlimit"
                next_grpc_over = now + cfg["grpc_over_every"]
            else:
                kind = rnd.choices(kinds, weights)[0]
            t0 = time.monotonic()
            if kind.startswith("grpc"):
                req = {"grpc_valid": "valid", "grpc_valid_budget": "budget", "grpc_wrong_shape": "shape",
                       "grpc_unknown_model": "model"}.get(kind)
                try:
                    if kind == "grpc_overlimit":
                        raw_infer(pay.grpc_over(), timeout=cfg["timeout"])
                    else:
                        stub.ModelInfer(grpc_req[req], timeout=cfg["timeout"])
                    outcome, answered, detail = "OK", True, ""
                except grpc.RpcError as e:
                    code, detail = e.code(), e.details() or ""
                    outcome = code.name
                    transport = (code == grpc.StatusCode.UNAVAILABLE and "shutting down" not in detail) or \
                        code == grpc.StatusCode.DEADLINE_EXCEEDED or \
                        (code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED)
                         and any(s in detail for s in ("Stream removed", "RST_STREAM", "Socket closed",
                                                       "Connection reset", "GOAWAY")))
                    if transport:
                        outcome = f"{code.name} (transport: {detail[:50]})"
                    elif code == grpc.StatusCode.UNAVAILABLE:
                        outcome = "UNAVAILABLE shutting down"
                    answered = not transport
                # grpcio hands small messages to the socket at once: started = sent.
                record(kind, outcome, answered, t0, t0, time.monotonic() - t0, detail)
                if not answered:
                    time.sleep(0.02)
                continue
            if kind == "http_overlimit":
                r = L.http_raw(ports["http"], "POST", TENSOR_INFER, JSON_HDR, pay.http_over(),
                               timeout=cfg["timeout"], total_timeout=cfg["timeout"])
                outcome, answered = http_outcome(r)
                if not answered:
                    # Refused before being read: the server owes no answer, but say so.
                    outcome = f"{outcome} (no 413 seen)"
                    answered = True
                record(kind, outcome, answered, t0, r.t_sent, r.elapsed)
                continue
            if kind == "http_json":
                r = ka.request("POST", TENSOR_INFER, pay.json, JSON_HDR)
            elif kind == "http_json_budget":
                r = ka.request("POST", TENSOR_INFER, pay.json_budget[rnd.choice([0.3, 0.5, 0.8, 1.0])], JSON_HDR)
            elif kind == "http_binary":
                r = ka.request("POST", TENSOR_INFER, pay.binary,
                               {"Inference-Header-Content-Length": str(pay.binary_hdr_len),
                                "Content-Type": "application/octet-stream"})
            elif kind == "image_png":
                r = ka.request("POST", IMAGE_INFER, pay.png, {"Inference-Header-Content-Length": "0",
                                                              "Content-Type": "application/octet-stream"})
            elif kind == "invalid_json":
                r = ka.request("POST", TENSOR_INFER, pay.invalid, JSON_HDR)
            elif kind == "wrong_shape":
                r = ka.request("POST", TENSOR_INFER, pay.wrong_shape, JSON_HDR)
            elif kind == "unknown_model":
                r = ka.request("POST", "/v2/models/no-such-model/infer", pay.json, JSON_HDR)
            elif kind == "bad_budget":
                r = ka.request("POST", TENSOR_INFER, pay.bad_budget, JSON_HDR)
            else:
                raise AssertionError(kind)
            outcome, answered = http_outcome(r)
            if outcome in KINDS[kind][1]:
                detail = ""
            elif answered:
                detail = r.body[:200].decode("utf-8", "replace")
            else:
                detail = f"previous request on this keep-alive connection: {prev_http}"
            record(kind, outcome, answered, t0, r.t_sent, r.elapsed, detail)
            prev_http = f"{kind} -> {outcome}" if ka.conn is not None else "-"
            if not answered:
                time.sleep(0.02)
        ka.close()
        channel.close()

    threads = [threading.Thread(target=thread_main, args=(tid,), daemon=True) for tid in thread_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = {k: {"n": len(v), "p50_ms": round(L.percentile(v, 50) * 1000, 2), "p99_ms": round(L.percentile(v, 99) * 1000, 2)}
           for k, v in latencies.items()}
    out.send({"counts": [(list(k), v) for k, v in counts.items()], "unanswered": unanswered_samples,
              "odd": odd_samples,
              "latency": lat, "raw_latency": {k: v[:: max(1, len(v) // 20000)] for k, v in latencies.items()}})
    out.close()


# --------------------------------------------------------------------------------------------
# The plot


def write_svg(path: Path, samples: list[dict], marks: dict[str, float], title: str):
    pts = [s for s in samples if s["rss"] is not None]
    if not pts:
        path.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="400" height="40">'
                        '<text x="10" y="25">no samples</text></svg>\n')
        return
    W, H = 960, 420
    ml, mr, mt, mb = 80, 80, 50, 60
    pw, ph = W - ml - mr, H - mt - mb
    t_max = max(max(s["t"] for s in pts), 1.0)
    rss = [s["rss"] / 1024 for s in pts]
    fds = [s["fds"] or 0 for s in pts]
    r_lo, r_hi = _nice_range(min(rss), max(rss))
    f_lo, f_hi = _nice_range(min(fds), max(fds))

    def x(t):
        return ml + pw * t / t_max

    def yr(v):
        return mt + ph * (1 - (v - r_lo) / (r_hi - r_lo))

    def yf(v):
        return mt + ph * (1 - (v - f_lo) / (f_hi - f_lo))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="24" text-anchor="middle" font-size="15">{_esc(title)}</text>',
           f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>']
    rfmt = ".0f" if r_hi - r_lo >= 20 else (".1f" if r_hi - r_lo >= 2 else ".2f")
    ffmt = ".0f" if f_hi - f_lo >= 20 else ".1f"
    for i in range(6):
        v = r_lo + (r_hi - r_lo) * i / 5
        y = yr(v)
        out.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{ml + pw}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#1f5fbf">{v:{rfmt}}</text>')
        fv = f_lo + (f_hi - f_lo) * i / 5
        out.append(f'<text x="{ml + pw + 6}" y="{yf(fv) + 4:.1f}" fill="#d2691e">{fv:{ffmt}}</text>')
    step = _nice_step(t_max / 8)
    t = 0.0
    while t <= t_max + 1e-9:
        out.append(f'<line x1="{x(t):.1f}" y1="{mt + ph}" x2="{x(t):.1f}" y2="{mt + ph + 5}" stroke="#888"/>')
        out.append(f'<text x="{x(t):.1f}" y="{mt + ph + 18}" text-anchor="middle">{t:.0f}</text>')
        t += step
    out.append(f'<text x="{ml + pw / 2}" y="{H - 15}" text-anchor="middle">time since start (s)</text>')
    out.append(f'<text x="20" y="{mt + ph / 2}" text-anchor="middle" fill="#1f5fbf" '
               f'transform="rotate(-90 20 {mt + ph / 2})">VmRSS (MiB)</text>')
    out.append(f'<text x="{W - 20}" y="{mt + ph / 2}" text-anchor="middle" fill="#d2691e" '
               f'transform="rotate(90 {W - 20} {mt + ph / 2})">open file descriptors</text>')
    for name, tm in marks.items():
        if tm is not None and 0 <= tm <= t_max:
            out.append(f'<line x1="{x(tm):.1f}" y1="{mt}" x2="{x(tm):.1f}" y2="{mt + ph}" stroke="#555" '
                       'stroke-dasharray="4 4"/>')
            out.append(f'<text x="{x(tm) + 4:.1f}" y="{mt + 14}" fill="#555">{_esc(name)}</text>')
    out.append('<polyline fill="none" stroke="#d2691e" stroke-width="1.2" points="'
               + " ".join(f"{x(s['t']):.1f},{yf(f):.1f}" for s, f in zip(pts, fds)) + '"/>')
    out.append('<polyline fill="none" stroke="#1f5fbf" stroke-width="1.6" points="'
               + " ".join(f"{x(s['t']):.1f},{yr(r):.1f}" for s, r in zip(pts, rss)) + '"/>')
    out.append(f'<rect x="{ml + 10}" y="{mt + ph - 44}" width="150" height="36" fill="white" stroke="#ccc"/>')
    out.append(f'<line x1="{ml + 18}" y1="{mt + ph - 32}" x2="{ml + 40}" y2="{mt + ph - 32}" stroke="#1f5fbf" '
               'stroke-width="2"/>')
    out.append(f'<text x="{ml + 46}" y="{mt + ph - 28}">VmRSS (MiB)</text>')
    out.append(f'<line x1="{ml + 18}" y1="{mt + ph - 16}" x2="{ml + 40}" y2="{mt + ph - 16}" stroke="#d2691e" '
               'stroke-width="2"/>')
    out.append(f'<text x="{ml + 46}" y="{mt + ph - 12}">open fds</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def _nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    import math
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _nice_range(lo: float, hi: float) -> tuple[float, float]:
    if hi - lo < 1e-9:
        return lo - 1, hi + 1
    pad = (hi - lo) * 0.08
    return max(0.0, lo - pad), hi + pad


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=str(L.DEFAULT_BINARY), help="sluice binary (default: %(default)s)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra argument for `sluice serve` (repeatable; use --server-arg=--flag=value)")
    ap.add_argument("--duration", type=float, default=1800, help="seconds of load before SIGTERM (default: 1800)")
    ap.add_argument("--warmup", type=float, default=60,
                    help="RSS growth and fd flatness are judged after this many seconds (default: 60; "
                         "at most half of --duration)")
    ap.add_argument("--threads", type=int, default=8, help="client threads (default: 8)")
    ap.add_argument("--procs", type=int, default=2, help="client processes the threads are spread over (default: 2)")
    ap.add_argument("--out", default=str(L.ROOT / "runs" / "soak"), help="output folder (default: runs/soak)")
    ap.add_argument("--json", help="also write the JSON summary here")
    ap.add_argument("--policy-period", type=float, default=10, help="seconds between policy changes (default: 10)")
    ap.add_argument("--budgets", default="0.5,0.8,1.0", help="budgets the policy alternates (default: %(default)s)")
    ap.add_argument("--http-overlimit-every", type=float, default=5.0, help="s between over-limit HTTP bodies")
    ap.add_argument("--grpc-overlimit-every", type=float, default=60.0, help="s between over-limit gRPC messages")
    ap.add_argument("--http-limit", type=int, default=64 << 20,
                    help="over-limit HTTP bodies are this + 1 bytes (default: 64 MiB, the old global limit; "
                         "per-model limits are lower)")
    ap.add_argument("--grpc-limit", type=int, default=256 << 20,
                    help="over-limit gRPC messages carry this + 1 KiB bytes (default: 256 MiB, the old limit)")
    ap.add_argument("--rss-growth-pct", type=float, default=5.0, help="allowed RSS growth after warm-up, %% (default: 5)")
    ap.add_argument("--fd-tolerance", type=int, default=None,
                    help="allowed fd spread after warm-up (default: 2 x threads + 16)")
    ap.add_argument("--timeout", type=float, default=60, help="client timeout per request, s (default: 60)")
    ap.add_argument("--drain-wait", type=float, default=60, help="wait this long for the exit after SIGTERM (default: 60)")
    ap.add_argument("--ready-timeout", type=float, default=120)
    args = ap.parse_args()

    L.check_binary(args.binary)
    L.install_signal_handlers()
    L.raise_nofile(65536)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warmup = min(args.warmup, args.duration / 2)
    fd_tol = args.fd_tolerance if args.fd_tolerance is not None else 2 * args.threads + 16
    budgets = [float(b) for b in args.budgets.split(",")]
    command = L.base_server_command(args.binary, args.server_arg)
    print("server:", " ".join(command))
    load_start = L.machine_load()
    print("machine:", load_start)
    server = L.Server(command, ready_timeout=args.ready_timeout)
    print(f"server pid {server.pid}: ready line after {server.line_s:.1f} s, /v2/health/ready 200 after "
          f"{server.ready_s:.1f} s; ports {server.ports}", flush=True)
    t0 = time.monotonic()
    sampler = L.Sampler(server, interval=1.0, t0=t0, csv_path=out / "rss.csv")
    sampler.start()

    sig_t = mp.Value("d", 0.0, lock=False)
    stop = mp.Event()
    cfg = {"timeout": args.timeout, "threads": args.threads, "http_limit": args.http_limit,
           "grpc_limit": args.grpc_limit, "http_over_every": args.http_overlimit_every,
           "grpc_over_every": args.grpc_overlimit_every}
    procs, pipes = [], []
    nprocs = max(1, min(args.procs, args.threads))
    for p in range(nprocs):
        tids = list(range(p, args.threads, nprocs))
        rd, wr = mp.Pipe(duplex=False)
        pr = mp.Process(target=worker_process, args=(p, tids, dict(server.ports), sig_t, stop, wr, cfg), daemon=True)
        pr.start()
        procs.append(pr)
        pipes.append(rd)
    print(f"load: {args.threads} threads in {nprocs} processes for {args.duration:.0f} s; policy change every "
          f"{args.policy_period:g} s; SIGTERM at the end", flush=True)

    policy = Counter()
    admin = L.KeepAlive(server.admin, timeout=10)
    next_policy = time.monotonic() + args.policy_period
    i = 0
    end = t0 + args.duration
    next_report = t0 + 60
    crashed = False
    while time.monotonic() < end:
        if not server.alive():
            crashed = True
            print(f"!! the server died at {time.monotonic() - t0:.0f} s (exit code {server.exit_code})")
            print(server.log_tail())
            break
        now = time.monotonic()
        if now >= next_policy:
            b = budgets[i % len(budgets)]
            for m in (L.TENSOR_MODEL, L.IMAGE_MODEL):
                r = admin.request("PATCH", f"/v2/models/{m}/gating",
                                  json.dumps({"budget": b, "actor": "soak"}).encode(), JSON_HDR)
                policy[r.outcome()] += 1
            i += 1
            next_policy += args.policy_period
        if now >= next_report:
            s = sampler.samples[-1] if sampler.samples else {}
            print(f"  {now - t0:6.0f} s: VmRSS {L.mib(s.get('rss'))} MiB, fds {s.get('fds')}, policy changes "
                  f"{L.fmt_counts(policy)}", flush=True)
            next_report += 60
        time.sleep(min(0.2, max(0.0, min(next_policy, end) - time.monotonic())))
    admin.close()

    # SIGTERM while the clients keep sending.
    sig_at = exit_code = drain_s = None
    if not crashed:
        sig_t.value = time.monotonic()
        sig_at = sig_t.value - t0
        server.sigterm_at = sig_t.value
        server.proc.send_signal(signal.SIGTERM)
        print(f"SIGTERM at {sig_at:.1f} s", flush=True)
        deadline = time.monotonic() + args.drain_wait
        while server.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if server.proc.poll() is None:
            print(f"!! the server did not exit within {args.drain_wait:.0f} s of SIGTERM: killing it")
            server.kill()
        else:
            drain_s = time.monotonic() - sig_t.value
        server.alive()
        exit_code = server.exit_code
        time.sleep(1.0)  # clients see the closed ports
    stop.set()
    results = []
    for rd in pipes:
        results.append(rd.recv() if rd.poll(args.timeout + 60) else None)
    for pr in procs:
        pr.join(10)
        if pr.is_alive():
            pr.kill()
    sampler.stop()
    server.kill()
    try:
        shutil.copy(server.log.name, out / "server.log")
    except OSError:
        pass

    # ---- figures
    counts: Counter = Counter()
    unanswered = []
    odd = []
    raw_lat: dict[str, list] = {}
    for r in results:
        if r is None:
            continue
        for k, v in r["counts"]:
            counts[tuple(k)] += v
        unanswered += r["unanswered"]
        odd += r["odd"]
        for k, v in r["raw_latency"].items():
            raw_lat.setdefault(k, []).extend(v)
    run_rows, by_kind = [], {}
    total_run = 0
    server_errors = Counter()
    unexpected = Counter()
    excluded_503 = 0
    for (bucket, kind, outcome), n in counts.items():
        if bucket == "unanswered":
            continue
        by_kind.setdefault(kind, {"run": Counter(), "after_sigterm": Counter()})[bucket][outcome] += n
        if bucket == "run":
            total_run += n
        is_5xx = outcome[:1] == "5" and outcome[:3].isdigit()
        is_grpc_err = outcome.split(" ")[0] in GRPC_SERVER_ERRORS and "transport" not in outcome
        if outcome in ("503 shutting down", "UNAVAILABLE shutting down") and sig_at is not None:
            excluded_503 += n
        elif is_5xx or is_grpc_err:
            server_errors[f"{kind}: {outcome}"] += n
        if bucket == "run" and outcome not in KINDS[kind][1] and (is_5xx or outcome[:1].isdigit() or
                                                                  outcome.split(" ")[0] in L.GRPC_CODES.values()):
            unexpected[f"{kind}: {outcome}"] += n
    unanswered_n = sum(n for (b, _, _), n in counts.items() if b == "unanswered")
    for kind in KINDS:
        if kind not in by_kind:
            continue
        run = by_kind[kind]["run"]
        after = by_kind[kind]["after_sigterm"]
        lat = raw_lat.get(kind, [])
        run_rows.append([kind, sum(run.values()), L.fmt_counts(run), L.fmt_counts(after),
                         "/".join(sorted(KINDS[kind][1])),
                         L.ms(L.percentile(lat, 50)), L.ms(L.percentile(lat, 99))])

    samples = [s for s in sampler.samples if s["rss"] is not None]
    pre = [s for s in samples if sig_at is None or s["t"] <= sig_at]
    post_warm = [s for s in pre if s["t"] >= warmup]
    rss_w = min(post_warm, key=lambda s: abs(s["t"] - warmup))["rss"] if post_warm else None
    rss_end = pre[-1]["rss"] if pre else None
    growth = None if not rss_w or rss_end is None else (rss_end - rss_w) / rss_w * 100
    fds = [s["fds"] for s in post_warm if s["fds"] is not None]
    fd_min, fd_max = (min(fds), max(fds)) if fds else (None, None)
    tenth = max(1, len(fds) // 10)
    fd_drift = (L.median(fds[-tenth:]) - L.median(fds[:tenth])) if fds else None
    hwm_end = pre[-1]["hwm"] if pre else None

    write_svg(out / "rss.svg", samples, {"warm-up end": warmup, "SIGTERM": sig_at},
              f"sluice soak: VmRSS and open fds, {args.duration:.0f} s, {args.threads} client threads")

    elapsed = sig_at if sig_at is not None else (time.monotonic() - t0)
    print("\n" + L.table(["kind", "sent", "outcomes before SIGTERM", "outcomes after SIGTERM", "expected",
                          "p50 ms", "p99 ms"], run_rows,
                         title=f"Requests by kind ({total_run} before SIGTERM in {elapsed:.0f} s = "
                               f"{total_run / max(elapsed, 1e-9):.1f} req/s)"))
    print(f"\npolicy changes (PATCH on the admin port): {L.fmt_counts(policy)}")
    print(f"5xx / gRPC server errors (excluding 503 'shutting down' after SIGTERM): "
          f"{sum(server_errors.values())} {dict(server_errors) if server_errors else ''}")
    print(f"503/UNAVAILABLE 'shutting down' after SIGTERM (excluded): {excluded_503}")
    print(f"unexpected answers (not counted as failures): {L.fmt_counts(unexpected)}")
    print(f"accepted requests (sent before SIGTERM) without an answer: {unanswered_n}")
    for u in unanswered[:10]:
        rel = {k: (None if u[k] in (None, 0.0) else round(u[k] - t0, 3)) for k in ("t_start", "t_sent", "sig")}
        print(f"   {u['kind']}: {u['outcome']} {u['detail']!r} start {rel['t_start']} s, sent {rel['t_sent']} s, "
              f"SIGTERM {rel['sig']} s")
    if odd:
        odd.sort(key=lambda u: u["t_start"])
        times = [u["t_start"] - t0 for u in odd]
        print(f"unexpected outcomes before SIGTERM: {len(odd)} kept, between {min(times):.1f} s and {max(times):.1f} s; "
              f"first ones:")
        for u in odd[:8]:
            print(f"   {u['t_start'] - t0:8.2f} s  {u['kind']}: {u['outcome']} {u['detail'][:120]!r}")
    print(f"VmRSS at {warmup:.0f} s: {L.mib(rss_w)} MiB; at the end: {L.mib(rss_end)} MiB; growth "
          f"{'-' if growth is None else f'{growth:+.2f}%'}; VmHWM at the end {L.mib(hwm_end)} MiB")
    print(f"open fds after {warmup:.0f} s: min {fd_min}, max {fd_max}, drift (median of last tenth - first tenth) "
          f"{fd_drift}")
    print(f"server exit code after SIGTERM: {exit_code}; drain took "
          f"{'-' if drain_s is None else f'{drain_s:.2f} s'}")
    print(f"outputs: {out / 'rss.csv'}, {out / 'rss.svg'}, {out / 'server.log'}")

    targets = {
        "server ran until SIGTERM and exited 0 after it": not crashed and exit_code == 0,
        "zero 5xx / gRPC server errors": not server_errors,
        "every accepted request answered": unanswered_n == 0,
        f"RSS growth after {warmup:.0f} s < {args.rss_growth_pct:g}%": growth is not None and growth < args.rss_growth_pct,
        f"open fds flat after {warmup:.0f} s (spread <= {fd_tol}, drift <= 4)":
            fd_min is not None and fd_max - fd_min <= fd_tol and abs(fd_drift) <= 4,
    }
    print("machine at the start:", load_start, "| at the end:", L.machine_load())
    print()
    for t, ok in targets.items():
        print(f"{'PASS' if ok else 'FAIL'}  {t}")
    summary = {
        "server_command": command, "duration_s": args.duration, "threads": args.threads, "warmup_s": warmup,
        "requests_before_sigterm": total_run, "by_kind": {k: {b: dict(c) for b, c in v.items()} for k, v in by_kind.items()},
        "policy_changes": dict(policy), "server_errors": dict(server_errors), "excluded_503_after_sigterm": excluded_503,
        "unexpected_answers": dict(unexpected), "unanswered_accepted": unanswered_n, "unanswered_samples": unanswered,
        "unexpected_samples": [dict(u, t_start=round(u["t_start"] - t0, 3)) for u in odd],
        "rss_at_warmup_mib": None if rss_w is None else round(rss_w / 1024, 1),
        "rss_end_mib": None if rss_end is None else round(rss_end / 1024, 1),
        "rss_growth_pct": None if growth is None else round(growth, 2),
        "vmhwm_end_mib": None if hwm_end is None else round(hwm_end / 1024, 1),
        "fds_after_warmup": {"min": fd_min, "max": fd_max, "drift": fd_drift},
        "sigterm_at_s": sig_at, "drain_s": drain_s, "server_exit_code": exit_code,
        "targets": {k: ("PASS" if v else "FAIL") for k, v in targets.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    L.write_json(args.json, summary)
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except L.ServerDied as e:
        print(f"harness: {e}", file=sys.stderr)
        sys.exit(1)
