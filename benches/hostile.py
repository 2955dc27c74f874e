#!/usr/bin/env python3
"""Hostile requests: does sluice survive the largest malicious request of every kind, sent by
64 concurrent clients, and keep serving well-formed requests within a bounded memory?

Target: "with default settings, 64 concurrent clients each sending the largest hostile
request of every kind -> the server stays up and keeps serving well-formed requests, and its
peak RSS (VmHWM) stays under 1 GiB".

What it does: starts `target/release/sluice serve` on the shipped repository (deploy/models,
ports chosen by the OS, bound to 127.0.0.1, default limits), then, one kind after another,
has 64 client threads send (each payload is built once and shared; big bodies are sent from
that one buffer without copies):

  a  oversized JSON: ~60 MB body for fashion-resnet20 whose `data` holds 30 M zeros for a
     [1,1,28,28] input (the old default accepted 64 MiB bodies and parsed it; today the
     model's 848 KiB limit refuses it from Content-Length);
  b1 lying binary header: `Inference-Header-Content-Length` claims 2**40 bytes, body ~60 MB;
  b2 lying binary size: the JSON part says binary_data_size = 2**31, ~60 MB of binary follow;
  c  gRPC ModelInfer for fashion-resnet20 whose contents.int_contents holds ~250 M packed
     zero ints (one 250 MB message; the old default accepted 256 MiB messages), sent over a
     small built-in HTTP/2 client (grpcio copies every message: 64 x 250 MB would not fit
     this machine); the message is hand-encoded and checked against tritonclient's
     service_pb2 on a small copy, and the stub (service_pb2_grpc) checks gRPC serves;
  d  PNG bomb: a valid PNG claiming 30000 x 30000 grayscale pixels of zeros (~0.9 MB file,
     900 MB decoded) to fashion-resnet20-image with `Inference-Header-Content-Length: 0`;
  d2 the same at 16000 x 16000 (~250 KB file, 256 MB decoded): under a 256 KiB encoded-size
     limit, so a server that has one must refuse it on its pixel count (or decode it);
  e  keep-alive flood: up to 10 000 tiny requests on ONE keep-alive connection per client
     (9 of 10 invalid JSON of several sorts, 1 of 10 the valid example), 60 s in all.

Meanwhile a well-formed client (its own process, so the attackers' threads do not slow it
down) sends deploy/examples/request.json continuously on a keep-alive connection, and the
server's VmRSS/VmHWM are sampled every 100 ms. After each kind the script checks the server
is alive and answers a valid request; if it died it prints its log and starts a new one for
the remaining kinds. A safety cap (default min(8 GiB, 60% of free memory)) kills the server
if its RSS passes it, so this machine does not swap or OOM: that counts as a FAIL.

Run (from the repository root, after `make build test-env`):
    .venv/bin/python benches/hostile.py [--json out.json] [--kinds a,b1,c] [--clients 64]
        [--server-arg=--http-max-body-bytes=8388608 ...]

Prints a table per kind (HTTP statuses / gRPC codes seen, time, peak RSS, the well-formed
client's successes, failures and p50/p99 latency during the kind) and PASS/FAIL per target.
Exit code: 0 when every target passed, 1 when one failed (or the server crashed), 2 on a
harness error.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import threading
import time
import urllib.parse
from collections import Counter

sys.dont_write_bytecode = True  # no benches/__pycache__ from importing loadlib
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loadlib as L  # noqa: E402

KINDS = ["a", "b1", "b2", "c", "d", "d2", "e"]
KIND_NAMES = {
    "a": "oversized JSON (30 M zeros, ~60 MB)",
    "b1": "binary header length 2**40 > body (~60 MB)",
    "b2": "binary_data_size 2**31, ~60 MB follow",
    "c": "gRPC int_contents ~250 MB",
    "d": "PNG bomb 30000x30000 gray",
    "d2": "PNG bomb 16000x16000 gray (<256 KiB)",
    "e": "keep-alive flood (10k tiny req/conn)",
}

INVALID_SMALL = [
    b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,28,28],"data":[0,0,0',
    b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,28,28],"data":[0,0,0]}]}',
    b'{"inputs":[{"name":"nope","datatype":"FP32","shape":[1,1,28,28],"data":[0]}]}',
    b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,28,-28],"data":[0]}]}',
    b'{"inputs":[{"name":"input","datatype":"INT8","shape":[1,1,28,28],"data":[0]}]}',
    b'{"inputs":"x"}',
    b'[]',
    b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,28,28],"data":[0,0]}],"parameters":{"sluice_budget":7}}',
]


# --------------------------------------------------------------------------------------------
# The well-formed client (a separate process)


def well_formed_client(port_value, stop_event, conn, timeout: float):
    """Loops valid requests on a keep-alive connection; sends back [(t_start, latency,
    outcome)] at the end. Follows port_value (a restarted server has a new port)."""
    L.child_process_init()
    body = L.load_request_json()
    path = f"/v2/models/{L.TENSOR_MODEL}/infer"
    records = []
    port = port_value.value
    ka = L.KeepAlive(port, timeout=timeout)
    while not stop_event.is_set():
        if port_value.value != port:
            ka.close()
            port = port_value.value
            ka = L.KeepAlive(port, timeout=timeout)
        t = time.monotonic()
        r = ka.request("POST", path, body, {"Content-Type": "application/json"})
        records.append((t, r.elapsed, r.outcome()))
        if r.status is None:
            time.sleep(0.05)  # don't spin on a dead server
    ka.close()
    conn.send(records)
    conn.close()


# --------------------------------------------------------------------------------------------
# Payloads (each built once, shared by the 64 clients)


def payload_a(zeros: int) -> bytes:
    head = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,28,28],"data":['
    return b"".join([head, b"0," * (zeros - 1), b'0]}]}'])


def payload_b(binary_bytes: int) -> tuple[bytes, int]:
    """JSON claiming binary_data_size = 2**31, then `binary_bytes` zeros. Returns (body, json length)."""
    js = (b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,28,28],'
          b'"parameters":{"binary_data_size":' + str(2 ** 31).encode() + b'}}]}')
    return js + bytes(binary_bytes), len(js)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def grpc_int_contents_message(n_ints: int, zeros: memoryview | None = None):
    """ModelInferRequest for fashion-resnet20 (input FP32 [1,1,28,28]) whose
    contents.int_contents holds n_ints packed zeros, as [prefix, zeros] parts."""
    from tritonclient.grpc import service_pb2
    tensor = service_pb2.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=[1, 1, 28, 28]).SerializeToString()
    contents_inner_len = 1 + len(_varint(n_ints)) + n_ints          # field 2 (packed int32)
    contents_head = b"\x12" + _varint(n_ints)
    tensor_len = len(tensor) + 1 + len(_varint(contents_inner_len)) + contents_inner_len
    request = service_pb2.ModelInferRequest(model_name=L.TENSOR_MODEL).SerializeToString()
    prefix = (request + b"\x2a" + _varint(tensor_len) + tensor            # inputs (field 5)
              + b"\x2a" + _varint(contents_inner_len) + contents_head)    # contents (field 5)
    zeros = zeros if zeros is not None else memoryview(bytes(n_ints))
    return [prefix, zeros[:n_ints]]


def check_grpc_encoding():
    """The hand-encoded message parses with tritonclient's own protobuf classes."""
    from tritonclient.grpc import service_pb2
    parts = grpc_int_contents_message(1000)
    msg = service_pb2.ModelInferRequest.FromString(b"".join(bytes(p) for p in parts))
    assert msg.model_name == L.TENSOR_MODEL
    assert len(msg.inputs) == 1 and list(msg.inputs[0].shape) == [1, 1, 28, 28]
    assert len(msg.inputs[0].contents.int_contents) == 1000


def grpc_stub_check(port: int) -> str:
    """One well-formed ModelInfer through grpcio's GRPCInferenceServiceStub."""
    import grpc
    import numpy as np
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    with grpc.insecure_channel(f"{L.HOST}:{port}") as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        try:
            ready = stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=10).ready
            req = service_pb2.ModelInferRequest(model_name=L.TENSOR_MODEL)
            t = req.inputs.add()
            t.name, t.datatype = "input", "FP32"
            t.shape.extend([1, 1, 28, 28])
            req.raw_input_contents.append(np.zeros((1, 1, 28, 28), np.float32).tobytes())
            stub.ModelInfer(req, timeout=30)
            return f"ready={ready}, ModelInfer OK"
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"


# --------------------------------------------------------------------------------------------


def _s(x):
    return None if x is None else round(x, 3)


def run_clients(n: int, fn, limit_s: float) -> tuple[Counter, list, float]:
    """n threads run fn(i) -> outcome string or Counter; returns (counts, extras, seconds)."""
    counts: Counter = Counter()
    extras: list = []
    lock = threading.Lock()
    barrier = threading.Barrier(n)

    def worker(i):
        try:
            barrier.wait(30)
        except threading.BrokenBarrierError:
            pass
        try:
            out = fn(i)
        except Exception as e:  # noqa: BLE001
            out = f"client error {type(e).__name__}: {e}"
        with lock:
            if isinstance(out, tuple):
                out, extra = out
                extras.append(extra)
            if isinstance(out, Counter):
                counts.update(out)
            else:
                counts[out] += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, limit_s - (time.monotonic() - t0)))
    stuck = sum(t.is_alive() for t in threads)
    if stuck:
        counts[f"client still waiting at the kind's limit ({limit_s:.0f} s)"] += stuck
    return counts, extras, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    L.add_server_args(ap)
    ap.add_argument("--kinds", default=",".join(KINDS), help="which kinds, comma-separated (default: %(default)s)")
    ap.add_argument("--clients", type=int, default=64, help="concurrent hostile clients per kind (default: 64)")
    ap.add_argument("--json-zeros", type=int, default=30_000_000, help="zeros in kind a's data (default: 30 M)")
    ap.add_argument("--binary-mb", type=float, default=60, help="binary bytes after kind b's JSON, MB (default: 60)")
    ap.add_argument("--grpc-mb", type=float, default=250, help="kind c's message size, MB (default: 250)")
    ap.add_argument("--png-side", type=int, default=30000, help="kind d's claimed width = height (default: 30000)")
    ap.add_argument("--png-side-small", type=int, default=16000,
                    help="kind d2's claimed width = height (default: 16000, a file under 256 KiB)")
    ap.add_argument("--flood-requests", type=int, default=10_000, help="kind e's requests per connection")
    ap.add_argument("--flood-seconds", type=float, default=60, help="kind e's time bound, seconds (default: 60)")
    ap.add_argument("--timeout", type=float, default=60, help="socket timeout of every client, s (default: 60)")
    ap.add_argument("--kind-limit", type=float, default=300, help="bound on one kind's duration, s (default: 300)")
    ap.add_argument("--rss-target-mib", type=float, default=1024, help="the VmHWM target, MiB (default: 1024)")
    ap.add_argument("--rss-cap-gib", type=float, default=8.0,
                    help="safety: kill the server when its RSS passes min(this, 60%% of MemAvailable) (default: 8)")
    ap.add_argument("--settle", type=float, default=2.0, help="pause after each kind, s (default: 2)")
    ap.add_argument("--warmup", type=float, default=10, help="valid load after each start, s (default: 10)")
    ap.add_argument("--ready-timeout", type=float, default=120)
    args = ap.parse_args()

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for k in kinds:
        if k not in KINDS:
            ap.error(f"unknown kind {k!r} (choose from {', '.join(KINDS)})")
    L.check_binary(args.binary)
    L.install_signal_handlers()
    L.raise_nofile(65536)
    check_grpc_encoding()
    cap_kib = L.rss_cap_default_kib(args.rss_cap_gib)
    command = L.base_server_command(args.binary, args.server_arg)
    print("server:", " ".join(command))
    load_start = L.machine_load()
    print("machine:", load_start)
    print(f"safety cap on the server's RSS: {cap_kib / L.MIB:.2f} GiB; target VmHWM < {args.rss_target_mib:.0f} MiB")

    t0 = time.monotonic()
    servers: list[L.Server] = []
    samplers: list[L.Sampler] = []

    def start_server() -> L.Server:
        s = L.Server(command, ready_timeout=args.ready_timeout)
        servers.append(s)
        sm = L.Sampler(s, interval=0.1, t0=t0, rss_cap_kib=cap_kib, fds=True)
        sm.start()
        samplers.append(sm)
        print(f"server pid {s.pid}: ready line after {s.line_s:.1f} s, /v2/health/ready 200 after {s.ready_s:.1f} s; "
              f"ports {s.ports}", flush=True)
        print(" ", L.warm_up(s, args.warmup), flush=True)
        return s

    def post_check(s: L.Server, within: float = 30.0) -> tuple[bool, float | None]:
        """A valid request answered 200 within `within` seconds of trying."""
        body = L.load_request_json()
        start = time.monotonic()
        while time.monotonic() - start < within:
            if not s.alive():
                return False, None
            r = L.http_raw(s.http, "POST", f"/v2/models/{L.TENSOR_MODEL}/infer", {"Content-Type": "application/json"},
                           body, timeout=10, total_timeout=10)
            if r.status == 200:
                return True, time.monotonic() - start
            time.sleep(0.2)
        return False, None

    server = start_server()
    time.sleep(0.5)
    st0 = server.proc_status()
    hwm_start = st0.get("VmHWM")
    print(f"idle: VmRSS {L.mib(st0.get('VmRSS'))} MiB, VmHWM {L.mib(hwm_start)} MiB, fds {server.fd_count()}, "
          f"server RLIMIT_NOFILE {server.nofile_limit()}")
    grpc_check_before = grpc_stub_check(server.grpc)
    print("gRPC stub check:", grpc_check_before)

    port_value = mp.Value("i", server.http)
    stop_wf = mp.Event()
    parent_conn, child_conn = mp.Pipe(duplex=False)
    wf = mp.Process(target=well_formed_client, args=(port_value, stop_wf, child_conn, args.timeout), daemon=True)
    wf.start()
    time.sleep(5.0)  # the well-formed client alone (reported as "before the attacks")
    phases = [("baseline", t0, time.monotonic())]

    results = []
    n = args.clients
    infer_path = f"/v2/models/{L.TENSOR_MODEL}/infer"
    for kind in kinds:
        name = KIND_NAMES[kind]
        print(f"\n== kind {kind}: {name}, {n} clients", flush=True)
        note = ""
        tb = time.monotonic()
        if kind == "a":
            body = payload_a(args.json_zeros)
            note = f"{len(body) / 1e6:.1f} MB JSON body, {args.json_zeros:,} zeros"
            port = server.http

            def fn(i, body=body, port=port):
                return sample(L.http_raw(port, "POST", infer_path, {"Content-Type": "application/json"}, body,
                                         timeout=args.timeout, total_timeout=args.kind_limit))
        elif kind in ("b1", "b2"):
            body, json_len = payload_b(int(args.binary_mb * 1e6))
            claim = 2 ** 40 if kind == "b1" else json_len
            note = (f"{len(body) / 1e6:.1f} MB body, Inference-Header-Content-Length {claim}, "
                    f"binary_data_size {2 ** 31}")
            port = server.http

            def fn(i, body=body, claim=claim, port=port):
                return sample(L.http_raw(port, "POST", infer_path,
                                         {"Inference-Header-Content-Length": str(claim),
                                          "Content-Type": "application/octet-stream"}, body,
                                         timeout=args.timeout, total_timeout=args.kind_limit))
        elif kind == "c":
            target = int(args.grpc_mb * 1e6)
            n_ints = target - 64
            try:
                zeros = memoryview(bytes(n_ints))
            except MemoryError:
                n_ints = n_ints // 4
                zeros = memoryview(bytes(n_ints))
            parts = grpc_int_contents_message(n_ints, zeros)
            size = sum(len(p) for p in parts)
            note = f"{size:,} B message, {n_ints:,} packed int32 zeros (1 B each)"
            port = server.grpc

            def fn(i, parts=parts, port=port):
                r = L.grpc_unary_raw(port, "/inference.GRPCInferenceService/ModelInfer", parts,
                                     timeout=args.timeout, total_timeout=args.kind_limit)
                samples.setdefault(r.outcome(), urllib.parse.unquote(r.message)[:160])
                durations.append(r.elapsed)
                return r.outcome()
        elif kind in ("d", "d2"):
            tp = time.monotonic()
            side = args.png_side if kind == "d" else args.png_side_small
            body = L.png_bomb(side, side)
            note = (f"{len(body):,} B PNG claiming {side}x{side} gray "
                    f"({side ** 2 / 1e6:.0f} MB decoded), built in {time.monotonic() - tp:.1f} s")
            port = server.http

            def fn(i, body=body, port=port):
                return sample(L.http_raw(port, "POST", f"/v2/models/{L.IMAGE_MODEL}/infer",
                                         {"Inference-Header-Content-Length": "0",
                                          "Content-Type": "application/octet-stream"}, body,
                                         timeout=args.timeout, total_timeout=args.kind_limit))
        else:  # e
            valid = L.load_request_json()
            deadline = time.monotonic() + args.flood_seconds
            note = (f"up to {args.flood_requests:,} requests per connection, {args.flood_seconds:.0f} s bound; "
                    f"9/10 invalid ({len(INVALID_SMALL)} sorts, <200 B), 1/10 valid")
            port = server.http

            def fn(i, port=port, valid=valid, deadline=deadline):
                c: Counter = Counter()
                ka = L.KeepAlive(port, timeout=args.timeout)
                sent = 0
                for j in range(args.flood_requests):
                    if time.monotonic() > deadline:
                        break
                    body = valid if (i + j) % 10 == 0 else INVALID_SMALL[(i + j) % len(INVALID_SMALL)]
                    r = ka.request("POST", infer_path, body, {"Content-Type": "application/json"})
                    c[sample(r)] += 1
                    sent += 1
                    if r.status is None:
                        if r.error == "refused":
                            break
                        time.sleep(0.01)
                ka.close()
                return c, {"sent": sent, "connects": ka.connects}

        samples: dict[str, str] = {}

        durations: list[float] = []

        def sample(r: L.HttpResult, samples=samples, durations=durations) -> str:
            """The outcome, keeping the first answer body seen for each outcome."""
            durations.append(r.elapsed)
            o = r.outcome()
            if o not in samples:
                samples[o] = r.body[:160].decode("utf-8", "replace")
            return o

        print("  payload:", note, flush=True)
        phase_start = time.monotonic()
        counts, extras, elapsed = run_clients(n, fn, args.kind_limit + 30)
        phase_end = time.monotonic()
        body = parts = zeros = fn = None  # noqa: F841 - free the payload
        alive_now = server.alive()
        time.sleep(args.settle)
        alive_after = server.alive()
        serving, recover_s = post_check(server) if alive_after else (False, None)
        sampler = samplers[-1]
        win = sampler.window(phase_start - t0, time.monotonic() - t0)
        peak_rss = max((s["rss"] or 0 for s in win), default=None)
        hwm_after = (server.proc_status().get("VmHWM") if alive_after else
                     max((s["hwm"] or 0 for s in sampler.samples), default=None))
        res = {
            "kind": kind, "name": name, "payload": note, "clients": n, "elapsed_s": round(elapsed, 2),
            "outcomes": dict(counts), "answer_samples": samples,
            "request_s": {"p50": _s(L.percentile(durations, 50)), "max": _s(max(durations, default=None))}, "server_alive": alive_now and alive_after,
            "serving_after": serving, "recover_s": None if recover_s is None else round(recover_s, 2),
            "peak_rss_mib": None if peak_rss is None else round(peak_rss / 1024, 1),
            "vmhwm_after_mib": None if hwm_after is None else round(hwm_after / 1024, 1),
            "killed_by_safety_cap": sampler.capped_at_kib is not None,
            "server_pid": server.pid,
        }
        if extras:
            res["flood_requests_sent"] = sum(x["sent"] for x in extras)
            res["flood_connections_opened"] = sum(x["connects"] for x in extras)
            res["flood_req_per_s"] = round(res["flood_requests_sent"] / max(elapsed, 1e-9), 1)
        print(f"  {elapsed:.1f} s; outcomes: {L.fmt_counts(counts)}; time per request p50 {res['request_s']['p50']} s, "
              f"max {res['request_s']['max']} s")
        for o, msg in samples.items():
            if msg:
                print(f"    {o}: {msg}")
        if extras:
            print(f"  flood: {res['flood_requests_sent']:,} requests sent ({res['flood_req_per_s']}/s), "
                  f"{res['flood_connections_opened']} connections opened by {n} clients")
        print(f"  server alive: {res['server_alive']}, serving a valid request after: {serving}"
              f"{'' if recover_s is None else f' (in {recover_s:.2f} s)'}; peak RSS {res['peak_rss_mib']} MiB, "
              f"VmHWM {res['vmhwm_after_mib']} MiB", flush=True)
        phases.append((kind, phase_start, phase_end))
        if not res["server_alive"]:
            server.alive()
            res["exit_code"] = server.exit_code
            why = "killed by the harness's safety cap" if sampler.capped_at_kib else f"exit code {server.exit_code}"
            print(f"  !! the server died during kind {kind} ({why})")
            if not sampler.capped_at_kib:
                print(server.log_tail())
            sampler.stop()
            server = start_server()
            port_value.value = server.http
            time.sleep(1.0)
        results.append(res)

    # Well-formed client results.
    stop_wf.set()
    records = parent_conn.recv() if parent_conn.poll(args.timeout + 30) else []
    wf.join(10)
    for res in results:
        k = res["kind"]
        ph = next(p for p in phases if p[0] == k)
        rec = [r for r in records if ph[1] <= r[0] < ph[2]]
        ok = [r[1] for r in rec if r[2] == "200"]
        bad = Counter(r[2] for r in rec if r[2] != "200")
        res["well_formed"] = {
            "ok": len(ok), "failed": sum(bad.values()), "failures": dict(bad),
            "p50_ms": None if not ok else round(L.percentile(ok, 50) * 1000, 2),
            "p99_ms": None if not ok else round(L.percentile(ok, 99) * 1000, 2),
            "max_ms": None if not ok else round(max(ok) * 1000, 2),
        }
    bl_rec = [r for r in records if phases[0][1] <= r[0] < phases[0][2]]
    bl_ok = [r[1] for r in bl_rec if r[2] == "200"]
    baseline_wf = {"ok": len(bl_ok), "p50_ms": None if not bl_ok else round(L.percentile(bl_ok, 50) * 1000, 2),
                   "p99_ms": None if not bl_ok else round(L.percentile(bl_ok, 99) * 1000, 2)}

    grpc_check_after = grpc_stub_check(server.grpc) if server.alive() else "server down"
    final_status = server.proc_status() if server.alive() else {}
    for sm in samplers:
        sm.stop()
    exit_code = server.terminate(timeout=60)

    # ---- report
    print("\n" + L.table(
        ["kind", "what", "s", "outcomes (HTTP status / gRPC code: count)", "up", "serving", "peak RSS MiB",
         "VmHWM MiB", "WF ok", "WF fail", "WF p50 ms", "WF p99 ms"],
        [[r["kind"], r["name"], r["elapsed_s"], L.fmt_counts(r["outcomes"]),
          "yes" if r["server_alive"] else ("KILLED(cap)" if r["killed_by_safety_cap"] else "DIED"),
          "yes" if r["serving_after"] else "NO", r["peak_rss_mib"], r["vmhwm_after_mib"],
          r["well_formed"]["ok"], r["well_formed"]["failed"], r["well_formed"]["p50_ms"],
          r["well_formed"]["p99_ms"]] for r in results],
        title=f"Hostile requests, {n} concurrent clients per kind (WF = the well-formed client during the kind)"))
    print(f"\nwell-formed client before the attacks: {baseline_wf['ok']} ok, p50 {baseline_wf['p50_ms']} ms, "
          f"p99 {baseline_wf['p99_ms']} ms")
    for r in results:
        if r["well_formed"]["failures"]:
            print(f"  WF failures during {r['kind']}: {L.fmt_counts(r['well_formed']['failures'])}")
    for sm, sv in zip(samplers, servers):
        if sm.capped_at_kib:
            print(f"server pid {sv.pid}: killed by the safety cap at VmRSS {sm.capped_at_kib / L.MIB:.2f} GiB")
    print(f"VmHWM at start {L.mib(hwm_start)} MiB; at the end {L.mib(final_status.get('VmHWM'))} MiB"
          f"{' (of the last server started)' if len(servers) > 1 else ''}; servers started: {len(servers)}")
    print(f"gRPC stub check before: {grpc_check_before}; after: {grpc_check_after}")
    print(f"server exit code after SIGTERM: {exit_code}")

    all_hwm = [max((s["hwm"] or 0 for s in sm.samples), default=0) for sm in samplers]
    peak_hwm_mib = max(all_hwm, default=0) / 1024
    deaths = [r for r in results if not r["server_alive"]]
    targets = {
        "server stays up under every kind": not deaths,
        "keeps serving well-formed requests (no well-formed request failed during any kind, "
        "a valid request answered after each)": all(r["serving_after"] for r in results)
        and all(r["well_formed"]["failed"] == 0 for r in results),
        f"peak RSS (VmHWM) < {args.rss_target_mib:.0f} MiB": peak_hwm_mib < args.rss_target_mib
        and not any(r["killed_by_safety_cap"] for r in results),
    }
    print("machine at the start:", load_start, "| at the end:", L.machine_load())
    print()
    capped = [r["kind"] for r in results if r["killed_by_safety_cap"]]
    crashed = [r["kind"] for r in deaths if not r["killed_by_safety_cap"]]
    why = {
        "stays": (f"  (crashed during: {', '.join(crashed)})" if crashed else "")
        + (f"  (killed by the safety cap during: {', '.join(capped)})" if capped else ""),
        "VmHWM": f"  (peak VmHWM {peak_hwm_mib:.0f} MiB"
        + (f"; RSS passed the {cap_kib / L.MIB:.2f} GiB safety cap during: {', '.join(capped)}" if capped else "")
        + ")",
    }
    for t, ok in targets.items():
        print(f"{'PASS' if ok else 'FAIL'}  {t}" + next((v for k, v in why.items() if k in t), ""))
    L.write_json(args.json, {
        "server_command": command, "clients": n, "rss_cap_mib": round(cap_kib / 1024),
        "vmhwm_start_mib": None if hwm_start is None else round(hwm_start / 1024, 1),
        "vmhwm_end_mib": None if not final_status else round(final_status.get("VmHWM", 0) / 1024, 1),
        "peak_vmhwm_mib": round(peak_hwm_mib, 1), "servers_started": len(servers),
        "well_formed_baseline": baseline_wf, "kinds": results,
        "grpc_stub_check": {"before": grpc_check_before, "after": grpc_check_after},
        "server_exit_code": exit_code, "targets": {k: ("PASS" if v else "FAIL") for k, v in targets.items()},
    })
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except L.ServerDied as e:
        print(f"harness: {e}", file=sys.stderr)
        sys.exit(1)
