#!/usr/bin/env python3
"""Health and metrics latency while the server is saturated with PNG requests.

Target: "p99 of /v2/health/ready and /metrics <= 10 ms while the server is saturated with PNG
requests".

What it does: starts `target/release/sluice serve` (deploy/models, OS-chosen ports,
127.0.0.1), probes both endpoints for --idle seconds with no load (for comparison), then
saturates fashion-resnet20-image for --window seconds (default 20) with --load-threads
client threads (default 16, in a separate process so the probes are not queued behind the
load generator's Python threads), each looping POSTs of one PNG per request with
`Inference-Header-Content-Length: 0` on a keep-alive connection, alternating a 512x512 noisy
grayscale PNG generated here (decoding and resizing it costs the server something) and
deploy/examples/ankle-boot.png (the noisy one is shrunk by 10% steps until the server accepts
it, when it limits image sizes). Meanwhile two probe processes (one per endpoint, so neither
waits for the other's GIL) GET /v2/health/ready (HTTP port) and /metrics (metrics port) every
20 ms, each on its own keep-alive connection (reconnecting after an error), and time them.

Reported: per endpoint and phase the probe count, failures, p50/p99/max latency; the PNG
throughput reached and its statuses. The load generator, the probes and the server share the
machine's cores (2 on the development machine), which the output says.

Run (from the repository root, after `make build test-env`):
    .venv/bin/python benches/health_latency.py [--window 20] [--load-threads 16]
        [--json out.json] [--server-arg=--some-flag=value]

Exit code: 0 when both p99s are within the target, 1 when one is not or the server died,
2 on a harness error.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import threading
import time
from collections import Counter

sys.dont_write_bytecode = True  # no benches/__pycache__ from importing loadlib
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loadlib as L  # noqa: E402


def load_process(port: int, threads: int, go, stop, out, noisy_side: int, timeout: float):
    """PNG load: `threads` keep-alive clients until `stop`; sends back per-phase counts."""
    L.child_process_init()
    images = [L.noisy_png(noisy_side), L.example_png()]
    path = f"/v2/models/{L.IMAGE_MODEL}/infer"
    headers = {"Inference-Header-Content-Length": "0", "Content-Type": "application/octet-stream"}
    results: list[tuple[float, float, str]] = []
    lock = threading.Lock()

    def worker(i):
        ka = L.KeepAlive(port, timeout=timeout)
        local = []
        j = i
        while not stop.is_set():
            body = images[j % 2]
            j += 1
            t = time.monotonic()
            r = ka.request("POST", path, body, headers)
            local.append((t, r.elapsed, r.outcome()))
            if r.status is None:
                time.sleep(0.05)
        ka.close()
        with lock:
            results.extend(local)

    go.wait(60)
    ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout + 30)
    out.send({"records": results, "sizes": [len(x) for x in images]})
    out.close()


def probe_process(port: int, path: str, period: float, start: float, until: float, timeout: float, out):
    """GET `path` every `period` s from `start` to `until` on one keep-alive connection
    (reconnecting after an error); sends back (start time, latency, outcome) per probe."""
    L.child_process_init()
    time.sleep(max(0.0, start - time.monotonic()))
    records = []
    ka = L.KeepAlive(port, timeout=timeout)
    nxt = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= until:
            break
        if now < nxt:
            time.sleep(nxt - now)
        t = time.monotonic()
        r = ka.request("GET", path)
        records.append((t, r.elapsed, r.outcome()))
        nxt += period
        if nxt < time.monotonic():
            nxt = time.monotonic() + period  # we fell behind: don't burst
    ka.close()
    out.send({"records": records, "connects": ka.connects})
    out.close()


def choose_noisy_side(port: int, side: int) -> tuple[int, list[str]]:
    """`side`, or 10% less until the image model accepts a noisy PNG of that size (a server
    with image limits refuses large ones with 413 before decoding)."""
    notes = []
    while side >= 28:
        r = L.http_raw(port, "POST", f"/v2/models/{L.IMAGE_MODEL}/infer",
                       {"Inference-Header-Content-Length": "0"}, L.noisy_png(side), timeout=30, total_timeout=30)
        if r.status == 200:
            return side, notes
        notes.append(f"a noisy {side}x{side} PNG is refused: {r.outcome()} {r.body[:150].decode('utf-8', 'replace')}")
        side = int(side * 0.9)
    return side, notes


def summarize(records, t_from, t_to):
    rec = [r for r in records if t_from <= r[0] < t_to]
    ok = [r[1] for r in rec if r[2] == "200"]
    bad = Counter(r[2] for r in rec if r[2] != "200")
    return {"probes": len(rec), "ok": len(ok), "failed": sum(bad.values()), "failures": dict(bad),
            "p50_ms": None if not ok else round(L.percentile(ok, 50) * 1000, 3),
            "p99_ms": None if not ok else round(L.percentile(ok, 99) * 1000, 3),
            "max_ms": None if not ok else round(max(ok) * 1000, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    L.add_server_args(ap)
    ap.add_argument("--window", type=float, default=20, help="saturated window, seconds (default: 20)")
    ap.add_argument("--idle", type=float, default=5, help="probing without load first, seconds (default: 5)")
    ap.add_argument("--warmup", type=float, default=10, help="valid load before the idle probes, s (default: 10)")
    ap.add_argument("--ramp", type=float, default=3, help="load before the measured window, seconds (default: 3)")
    ap.add_argument("--load-threads", type=int, default=16, help="PNG client threads (default: 16)")
    ap.add_argument("--noisy-side", type=int, default=512,
                    help="side of the generated noisy PNG (default: 512; 10%% smaller while the server refuses it)")
    ap.add_argument("--period-ms", type=float, default=20, help="probe period per endpoint, ms (default: 20)")
    ap.add_argument("--target-ms", type=float, default=10, help="p99 target, ms (default: 10)")
    ap.add_argument("--timeout", type=float, default=30, help="socket timeout, s (default: 30)")
    ap.add_argument("--ready-timeout", type=float, default=120)
    args = ap.parse_args()

    L.check_binary(args.binary)
    L.install_signal_handlers()
    command = L.base_server_command(args.binary, args.server_arg)
    print("server:", " ".join(command))
    load_start = L.machine_load()
    print("machine:", load_start)
    server = L.Server(command, ready_timeout=args.ready_timeout)
    print(f"server pid {server.pid}: ready line after {server.line_s:.1f} s, /v2/health/ready 200 after "
          f"{server.ready_s:.1f} s; ports {server.ports}", flush=True)
    print(L.warm_up(server, args.warmup), flush=True)  # the first requests after a start are slow

    noisy_side, notes = choose_noisy_side(server.http, args.noisy_side)
    for n in notes:
        print("note:", n)
    print(f"PNG load: a noisy {noisy_side}x{noisy_side} grayscale PNG and ankle-boot.png, alternately")
    go, stop = mp.Event(), mp.Event()
    parent, child = mp.Pipe(duplex=False)
    loader = mp.Process(target=load_process, args=(server.http, args.load_threads, go, stop, child,
                                                   noisy_side, args.timeout), daemon=True)
    loader.start()

    period = args.period_ms / 1000
    t_idle = time.monotonic() + 1.0  # the probe processes start meanwhile
    t_load = t_idle + args.idle
    t_win = t_load + args.ramp
    t_end = t_win + args.window
    # Each probe runs in a process of its own: two probe threads in one interpreter would
    # wait for each other's GIL (reading a ~50 KB scrape takes the metrics probe a while),
    # which is the harness's latency, not the server's.
    probes = {}
    for name, port, path in (("health", server.http, "/v2/health/ready"), ("metrics", server.metrics, "/metrics")):
        rx, tx = mp.Pipe(duplex=False)
        proc = mp.Process(target=probe_process, args=(port, path, period, t_idle, t_end, args.timeout, tx),
                          daemon=True)
        proc.start()
        probes[name] = (proc, rx)
    time.sleep(max(0.0, t_load - time.monotonic()))
    go.set()
    print(f"idle probes done; PNG load from {args.load_threads} threads for {args.ramp + args.window:.0f} s",
          flush=True)
    results = {}
    for name, (proc, rx) in probes.items():
        wait = max(0.0, t_end - time.monotonic()) + args.timeout + 10
        results[name] = rx.recv() if rx.poll(wait) else {"records": [], "connects": None}
        proc.join(10)
    health, metrics = results["health"]["records"], results["metrics"]["records"]
    connects = {name: r["connects"] for name, r in results.items()}
    stop.set()
    load = parent.recv() if parent.poll(args.timeout + 40) else {"records": [], "sizes": []}
    loader.join(10)
    alive = server.alive()
    if not alive:
        print(f"!! the server died (exit code {server.exit_code})")
        print(server.log_tail())
    exit_code = server.terminate(60)

    png = [r for r in load["records"] if t_win <= r[0] < t_end]
    png_ok = [r[1] for r in png if r[2] == "200"]
    png_status = Counter(r[2] for r in png)
    res = {
        "idle": {"health": summarize(health, t_idle, t_load), "metrics": summarize(metrics, t_idle, t_load)},
        "saturated": {"health": summarize(health, t_win, t_end), "metrics": summarize(metrics, t_win, t_end)},
        "png": {"requests": len(png), "ok": len(png_ok), "statuses": dict(png_status),
                "per_s": round(len(png_ok) / args.window, 1),
                "p50_ms": None if not png_ok else round(L.percentile(png_ok, 50) * 1000, 2),
                "p99_ms": None if not png_ok else round(L.percentile(png_ok, 99) * 1000, 2),
                "image_bytes": load["sizes"]},
        "probe_connections": connects, "keep_alive": True, "cpus": os.cpu_count(),
        "noisy_png_side": noisy_side, "noisy_png_notes": notes,
    }
    rows = []
    for phase in ("idle", "saturated"):
        for ep in ("health", "metrics"):
            s = res[phase][ep]
            rows.append([phase, "/v2/health/ready" if ep == "health" else "/metrics", s["probes"], s["failed"],
                         s["p50_ms"], s["p99_ms"], s["max_ms"]])
    print("\n" + L.table(["phase", "endpoint", "probes", "failed", "p50 ms", "p99 ms", "max ms"], rows,
                         title=f"Probe latency (every {args.period_ms:g} ms per endpoint, keep-alive connections; "
                               f"saturated window {args.window:g} s)"))
    p = res["png"]
    print(f"\nPNG load: {p['ok']} answered 200 in {args.window:g} s = {p['per_s']} req/s "
          f"(p50 {p['p50_ms']} ms, p99 {p['p99_ms']} ms; statuses {L.fmt_counts(p['statuses'])}); "
          f"images {p['image_bytes']} B (noisy {noisy_side}x{noisy_side} and ankle-boot.png)")
    print(f"probe connections opened: {connects} (1 each = keep-alive held throughout)")
    print(f"note: the load generator ({args.load_threads} threads), the probes and the server share "
          f"{os.cpu_count()} CPU cores on this machine; the probes' latency includes their own scheduling")
    print(f"server exit code after SIGTERM: {exit_code}")

    sat = res["saturated"]
    targets = {
        "server stayed up": alive,
        f"/v2/health/ready p99 <= {args.target_ms:g} ms (saturated)":
            sat["health"]["p99_ms"] is not None and sat["health"]["p99_ms"] <= args.target_ms
            and sat["health"]["failed"] == 0,
        f"/metrics p99 <= {args.target_ms:g} ms (saturated)":
            sat["metrics"]["p99_ms"] is not None and sat["metrics"]["p99_ms"] <= args.target_ms
            and sat["metrics"]["failed"] == 0,
        "the PNG load ran (requests answered 200 during the window)": p["ok"] > 0,
    }
    print("machine at the start:", load_start, "| at the end:", L.machine_load())
    print()
    for t, ok in targets.items():
        print(f"{'PASS' if ok else 'FAIL'}  {t}")
    res["targets"] = {k: ("PASS" if v else "FAIL") for k, v in targets.items()}
    res["server_command"] = command
    res["server_exit_code"] = exit_code
    L.write_json(args.json, res)
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except L.ServerDied as e:
        print(f"harness: {e}", file=sys.stderr)
        sys.exit(1)
