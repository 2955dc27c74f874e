#!/usr/bin/env python3
"""Slowloris: do 1 000 connections that trickle their headers or body at 1 byte/s slow down a
well-formed client?

Target: "1 000 slowloris connections (headers or body trickled 1 byte/s) don't delay a
well-formed client by more than 10%" - judged on the median over rounds of the attack/baseline
ratios of the well-formed client's throughput (>= 0.90) and p50 latency (<= 1.10); the p99
ratio is printed too, but not judged (on 2 shared cores it moves more than 10% between two
quiet windows).

What it does: starts `target/release/sluice serve` (deploy/models, OS-chosen ports, 127.0.0.1)
after raising RLIMIT_NOFILE (the server inherits it), then runs --rounds interleaved pairs of
windows (baseline, attack; the order alternates between rounds):

  - the well-formed client: --threads threads (default 4), each with one keep-alive
    connection, POST deploy/examples/request.json to fashion-resnet20 back to back for
    --window seconds (default 10); requests/s, p50, p99;
  - the attack (its own process, one thread, non-blocking sockets and a selector): 1 000
    connections opened over about --ramp seconds before the window starts; half send a
    request line and headers 1 byte per second and never finish them, half send complete
    headers with Content-Length: 1000000 (--body-length; halved until the server waits for
    the body instead of refusing it at once with 413, as a server with per-model body limits
    does) for /v2/models/fashion-resnet20/infer and then trickle the body 1 byte per
    second. Connections the server closes are counted (with how long they had lived and
    what, if anything, the server answered) and reopened, so about 1 000 stay open during
    the window; the reconnects are reported.

Run (from the repository root, after `make build test-env`):
    .venv/bin/python benches/slowloris.py [--rounds 3] [--window 10] [--connections 1000]
        [--json out.json] [--server-arg=--some-flag=value]

Exit code: 0 when the target passed, 1 when it failed or the server died, 2 on a harness error.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import selectors
import socket
import sys
import threading
import time
from collections import Counter

sys.dont_write_bytecode = True  # no benches/__pycache__ from importing loadlib
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loadlib as L  # noqa: E402

INFER = f"/v2/models/{L.TENSOR_MODEL}/infer"
HEADER_TRICKLE = (f"POST {INFER} HTTP/1.1\r\nHost: {L.HOST}\r\nContent-Type: application/json\r\n"
                  "X-Slowloris: ").encode()


def body_headers(length: int) -> bytes:
    return (f"POST {INFER} HTTP/1.1\r\nHost: {L.HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def refused_up_front(port: int, length: int) -> bytes | None:
    """The server's answer when it refuses a body of `length` right after the headers
    (a 413 for a length over the model's limit), None when it waits for the body."""
    with socket.create_connection((L.HOST, port), timeout=5) as c:
        c.sendall(body_headers(length))
        c.settimeout(1.0)
        try:
            return c.recv(4096) or b"(closed)"
        except socket.timeout:
            return None


def choose_body_length(port: int, wanted: int) -> tuple[int, list[str]]:
    """`wanted`, or halved until the server waits for the body instead of refusing it."""
    notes, length = [], wanted
    while length > 1000:
        answer = refused_up_front(port, length)
        if answer is None:
            return length, notes
        status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
        notes.append(f"Content-Length {length} refused up front: {status_line}")
        length //= 2
    return length, notes


# --------------------------------------------------------------------------------------------
# The attack process: one thread drives every socket.


class Attacker:
    __slots__ = ("sock", "kind", "opened", "sent", "next_send", "answer")

    def __init__(self, sock, kind, now, offset):
        self.sock, self.kind, self.opened = sock, kind, now
        self.sent = 0
        self.next_send = now + offset
        self.answer = b""


def attack_process(port: int, cmd, rate_hz: float, body_length: int):
    L.child_process_init()
    L.raise_nofile(65536)
    sel = selectors.DefaultSelector()
    attackers: dict[int, Attacker] = {}
    stats = Counter()
    close_ages: list[tuple[str, float]] = []
    answers: Counter = Counter()
    target = 0
    ramp_per_tick = 0
    keep = False
    alive_samples: list[int] = []
    next_alive_sample = 0.0
    seq = 0
    body_hdrs = body_headers(body_length)

    def open_one(now):
        nonlocal seq
        kind = "headers" if seq % 2 == 0 else "body"
        seq += 1
        try:
            s = socket.create_connection((L.HOST, port), timeout=1.0)
        except OSError as e:
            stats[f"connect failed: {type(e).__name__}"] += 1
            return
        s.setblocking(False)
        a = Attacker(s, kind, now, (seq % 1000) / 1000.0 / rate_hz)
        try:
            if kind == "body":
                s.send(body_hdrs)
            else:
                s.send(HEADER_TRICKLE[:1])
                a.sent = 1
        except OSError:
            s.close()
            stats["closed while opening"] += 1
            return
        attackers[s.fileno()] = a
        sel.register(s, selectors.EVENT_READ, a)
        stats["opened"] += 1

    def close_one(a: Attacker, now: float, by_server: bool):
        try:
            sel.unregister(a.sock)
        except (KeyError, ValueError):
            pass
        attackers.pop(a.sock.fileno(), None)
        a.sock.close()
        if by_server:
            stats["closed by server"] += 1
            close_ages.append((a.kind, now - a.opened))
            line = a.answer.split(b"\r\n", 1)[0].decode("latin-1", "replace")[:40] or "(no answer)"
            answers[f"{a.kind}: {line}"] += 1

    while True:
        now = time.monotonic()
        # Commands from the parent.
        while cmd.poll(0):
            op, arg = cmd.recv()
            if op == "open":
                target, ramp_s = arg
                ramp_per_tick = max(1, int(target / max(ramp_s / 0.01, 1)))
                keep = True
                stats.clear()
                close_ages.clear()
                answers.clear()
                alive_samples.clear()
            elif op == "snapshot":
                cmd.send({"alive": len(attackers), "stats": dict(stats), "close_ages": list(close_ages),
                          "answers": dict(answers), "alive_min": min(alive_samples, default=len(attackers)),
                          "alive_max": max(alive_samples, default=len(attackers))})
                alive_samples.clear()
            elif op == "stop":
                keep = False
                for a in list(attackers.values()):
                    close_one(a, now, by_server=False)
                cmd.send({"stats": dict(stats)})
            elif op == "exit":
                for a in list(attackers.values()):
                    close_one(a, now, by_server=False)
                return
        # Ramp up / reopen what the server closed.
        if keep and len(attackers) < target:
            for _ in range(min(ramp_per_tick, target - len(attackers))):
                if stats["opened"] >= target:
                    stats["reconnects"] += 1
                open_one(now)
        # Server activity: an answer or a close.
        for key, _ in sel.select(timeout=0):
            a: Attacker = key.data
            try:
                data = a.sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                a.answer += data[: 200 - len(a.answer)] if len(a.answer) < 200 else b""
                continue
            close_one(a, now, by_server=True)
        # One byte per second each (spread over the second).
        for a in list(attackers.values()):
            if now >= a.next_send:
                a.next_send += 1.0 / rate_hz
                if a.kind == "headers":
                    b = HEADER_TRICKLE[a.sent: a.sent + 1] if a.sent < len(HEADER_TRICKLE) else b"a"
                else:
                    b = b"0" if a.sent < body_length - 1 else b""
                if not b:
                    continue
                try:
                    a.sock.send(b)
                    a.sent += 1
                except BlockingIOError:
                    pass
                except OSError:
                    close_one(a, now, by_server=True)
        if now >= next_alive_sample:
            alive_samples.append(len(attackers))
            next_alive_sample = now + 0.1
        time.sleep(0.01)


# --------------------------------------------------------------------------------------------
# The well-formed client


def measure(port: int, threads: int, window: float, timeout: float) -> dict:
    body = L.load_request_json()
    lat: list[list[float]] = [[] for _ in range(threads)]
    fails: list[Counter] = [Counter() for _ in range(threads)]
    start = threading.Barrier(threads + 1)
    end_at = [0.0]

    def worker(i):
        ka = L.KeepAlive(port, timeout=timeout)
        start.wait()
        while time.monotonic() < end_at[0]:
            r = ka.request("POST", INFER, body, {"Content-Type": "application/json"})
            if r.status == 200:
                lat[i].append(r.elapsed)
            else:
                fails[i][r.outcome()] += 1
                time.sleep(0.01)
        ka.close()

    ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    end_at[0] = time.monotonic() + window
    start.wait()
    t0 = time.monotonic()
    for t in ts:
        t.join(window + timeout + 5)
    elapsed = time.monotonic() - t0
    all_lat = [x for v in lat for x in v]
    failed = Counter()
    for f in fails:
        failed.update(f)
    return {"ok": len(all_lat), "failed": sum(failed.values()), "failures": dict(failed),
            "rps": len(all_lat) / elapsed, "p50": L.percentile(all_lat, 50), "p99": L.percentile(all_lat, 99),
            "elapsed": elapsed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    L.add_server_args(ap)
    ap.add_argument("--rounds", type=int, default=3, help="baseline/attack pairs (default: 3)")
    ap.add_argument("--window", type=float, default=10, help="measured window, seconds (default: 10)")
    ap.add_argument("--threads", type=int, default=4, help="well-formed client threads (default: 4)")
    ap.add_argument("--connections", type=int, default=1000, help="slowloris connections (default: 1000)")
    ap.add_argument("--ramp", type=float, default=2.0, help="seconds to open them over (default: 2)")
    ap.add_argument("--settle", type=float, default=1.0, help="pause between opening and measuring, s (default: 1)")
    ap.add_argument("--rate", type=float, default=1.0, help="bytes per second per attacker (default: 1)")
    ap.add_argument("--body-length", type=int, default=1_000_000,
                    help="Content-Length the body attackers declare (default: 1000000; halved until the "
                         "server waits for the body rather than refusing it up front with 413)")
    ap.add_argument("--warmup", type=float, default=10, help="valid load before round 1, s (default: 10)")
    ap.add_argument("--timeout", type=float, default=30, help="socket timeout of the well-formed client, s")
    ap.add_argument("--max-slowdown", type=float, default=0.10, help="allowed slowdown (default: 0.10)")
    ap.add_argument("--ready-timeout", type=float, default=120)
    args = ap.parse_args()

    L.check_binary(args.binary)
    L.install_signal_handlers()
    nofile = L.raise_nofile(max(65536, args.connections * 4))
    command = L.base_server_command(args.binary, args.server_arg)
    print("server:", " ".join(command))
    load_start = L.machine_load()
    print("machine:", load_start)
    server = L.Server(command, ready_timeout=args.ready_timeout)
    print(f"server pid {server.pid}: ready line after {server.line_s:.1f} s, /v2/health/ready 200 after "
          f"{server.ready_s:.1f} s; ports {server.ports}; RLIMIT_NOFILE here {nofile}, "
          f"server's {server.nofile_limit()}", flush=True)
    t0 = time.monotonic()
    sampler = L.Sampler(server, interval=0.5, t0=t0)
    sampler.start()

    body_length, notes = choose_body_length(server.http, args.body_length)
    for n in notes:
        print("note:", n)
    print(f"body attackers declare Content-Length {body_length} and trickle it")
    cmd_parent, cmd_child = mp.Pipe()
    attack = mp.Process(target=attack_process, args=(server.http, cmd_child, args.rate, body_length), daemon=True)
    attack.start()

    def ask(op, arg=None, timeout=60.0):
        cmd_parent.send((op, arg))
        if op in ("snapshot", "stop"):
            if not cmd_parent.poll(timeout):
                raise RuntimeError(f"the attack process did not answer {op}")
            return cmd_parent.recv()
        return None

    print(L.warm_up(server, args.warmup), flush=True)  # the first requests after a start are slow
    rounds = []
    died = False
    for rnd in range(args.rounds):
        order = ["baseline", "attack"] if rnd % 2 == 0 else ["attack", "baseline"]
        row = {"round": rnd + 1}
        for what in order:
            if not server.alive():
                died = True
                break
            if what == "baseline":
                ta = time.monotonic() - t0
                m = measure(server.http, args.threads, args.window, args.timeout)
                m["fds"] = _fds(sampler, ta, time.monotonic() - t0)
                row["baseline"] = m
                print(f"round {rnd + 1} baseline: {m['rps']:.1f} req/s, p50 {L.ms(m['p50'])} ms, "
                      f"p99 {L.ms(m['p99'])} ms, failed {m['failed']}", flush=True)
            else:
                topen = time.monotonic()
                ask("open", (args.connections, args.ramp))
                # Wait until they are all open (bounded).
                snap = None
                while time.monotonic() - topen < args.ramp + 30:
                    time.sleep(0.25)
                    snap = ask("snapshot")
                    if snap["alive"] >= args.connections:
                        break
                open_s = time.monotonic() - topen
                time.sleep(args.settle)
                ask("snapshot")  # reset the alive min/max for the window
                before = ask("snapshot")
                ta = time.monotonic() - t0
                m = measure(server.http, args.threads, args.window, args.timeout)
                tb = time.monotonic() - t0
                after = ask("snapshot")
                ask("stop")
                m["fds"] = _fds(sampler, ta, tb)
                st_b, st_a = before["stats"], after["stats"]
                m["attack"] = {
                    "open_s": round(open_s, 2),
                    "alive_at_window_start": before["alive"],
                    "alive_at_window_end": after["alive"],
                    "alive_min_in_window": after["alive_min"],
                    "opened_total": st_a.get("opened", 0),
                    "reconnects_total": st_a.get("reconnects", 0),
                    "reconnects_in_window": st_a.get("reconnects", 0) - st_b.get("reconnects", 0),
                    "closed_by_server_total": st_a.get("closed by server", 0),
                    "closed_by_server_in_window": st_a.get("closed by server", 0) - st_b.get("closed by server", 0),
                    "connect_failures": {k: v for k, v in st_a.items() if k.startswith("connect failed")},
                    "close_age_median_s": {k: _med([x[1] for x in after["close_ages"] if x[0] == k])
                                           for k in ("headers", "body")},
                    "close_age_max_s": {k: _max([x[1] for x in after["close_ages"] if x[0] == k])
                                        for k in ("headers", "body")},
                    "server_answers": after["answers"],
                }
                row["attack"] = m
                a = m["attack"]
                print(f"round {rnd + 1} attack:   {m['rps']:.1f} req/s, p50 {L.ms(m['p50'])} ms, "
                      f"p99 {L.ms(m['p99'])} ms, failed {m['failed']}; attackers open at start/min/end "
                      f"{a['alive_at_window_start']}/{a['alive_min_in_window']}/{a['alive_at_window_end']} "
                      f"(all open after {a['open_s']} s), closed by server {a['closed_by_server_total']}, "
                      f"reconnects {a['reconnects_total']}, server fds {m['fds']}", flush=True)
                time.sleep(1.0)
        if died:
            break
        rounds.append(row)

    ask("exit")
    attack.join(10)
    if attack.is_alive():
        attack.kill()
    alive = server.alive()
    sampler.stop()
    if not alive:
        print(f"!! the server died (exit code {server.exit_code})")
        print(server.log_tail())
    exit_code = server.terminate(60)

    ratios = []
    for r in rounds:
        b, a = r["baseline"], r["attack"]
        ratios.append({
            "rps": a["rps"] / b["rps"] if b["rps"] else None,
            "p50": a["p50"] / b["p50"] if b["p50"] and a["p50"] else None,
            "p99": a["p99"] / b["p99"] if b["p99"] and a["p99"] else None,
        })
    med = {k: L.median([x[k] for x in ratios]) for k in ("rps", "p50", "p99")}
    rows = []
    for r, q in zip(rounds, ratios):
        b, a = r["baseline"], r["attack"]
        rows.append([r["round"], f"{b['rps']:.1f}", L.ms(b["p50"]), L.ms(b["p99"]), f"{a['rps']:.1f}", L.ms(a["p50"]),
                     L.ms(a["p99"]), _r(q["rps"]), _r(q["p50"]), _r(q["p99"]),
                     f"{a['attack']['alive_at_window_start']}/{a['attack']['alive_min_in_window']}/"
                     f"{a['attack']['alive_at_window_end']}",
                     a["attack"]["closed_by_server_total"], a["attack"]["reconnects_total"],
                     b["failed"] + a["failed"]])
    print("\n" + L.table(
        ["round", "base req/s", "base p50 ms", "base p99 ms", "atk req/s", "atk p50 ms", "atk p99 ms",
         "req/s ratio", "p50 ratio", "p99 ratio", "attackers start/min/end", "closed by srv", "reconnects",
         "WF failed"], rows,
        title=f"Slowloris: {args.connections} connections at {args.rate:g} B/s vs {args.threads} keep-alive client "
              f"threads, {args.window:g} s windows"))
    answers = Counter()
    ages = {"headers": [], "body": []}
    for r in rounds:
        answers.update(r["attack"]["attack"]["server_answers"])
        for k in ages:
            if r["attack"]["attack"]["close_age_median_s"][k] is not None:
                ages[k].append(r["attack"]["attack"]["close_age_median_s"][k])
    failures = Counter()
    for r in rounds:
        failures.update(r["attack"]["failures"])
    print(f"\nmedian ratios attack/baseline: throughput {_r(med['rps'])}, p50 {_r(med['p50'])}, p99 {_r(med['p99'])}")
    print(f"server closes of attack connections (kind: first line of the server's answer): {L.fmt_counts(answers)}")
    print(f"median age at the server's close: header tricklers {_med(ages['headers'])} s, "
          f"body tricklers {_med(ages['body'])} s")
    if failures:
        print(f"well-formed client failures under attack: {L.fmt_counts(failures)}")
    print(f"server exit code after SIGTERM: {exit_code}")
    print("note: the client, the attack process and the server share this machine's cores")

    limit = args.max_slowdown
    targets = {
        "server stayed up": alive and not died,
        f"throughput under attack >= {1 - limit:.2f} x baseline (median of rounds)":
            med["rps"] is not None and med["rps"] >= 1 - limit,
        f"p50 latency under attack <= {1 + limit:.2f} x baseline (median of rounds)":
            med["p50"] is not None and med["p50"] <= 1 + limit,
        "no well-formed request failed": all(r["baseline"]["failed"] == 0 and r["attack"]["failed"] == 0 for r in rounds),
    }
    print("machine at the start:", load_start, "| at the end:", L.machine_load())
    print()
    for t, ok in targets.items():
        print(f"{'PASS' if ok else 'FAIL'}  {t}")
    print(f"info  p99 ratio (not judged): {_r(med['p99'])}")
    L.write_json(args.json, {
        "server_command": command, "connections": args.connections, "rate_bytes_per_s": args.rate,
        "threads": args.threads, "window_s": args.window, "body_length": body_length, "body_length_notes": notes,
        "rounds": rounds, "ratios": ratios,
        "median_ratios": med, "server_exit_code": exit_code,
        "targets": {k: ("PASS" if v else "FAIL") for k, v in targets.items()},
    })
    return 0 if all(targets.values()) else 1


def _med(v):
    m = L.median(v)
    return None if m is None else round(m, 1)


def _max(v):
    return round(max(v), 1) if v else None


def _r(x):
    return "-" if x is None else f"{x:.3f}"


def _fds(sampler: L.Sampler, ta: float, tb: float) -> str:
    w = [s["fds"] for s in sampler.window(ta, tb) if s["fds"] is not None]
    return f"{min(w)}-{max(w)}" if w else "-"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except L.ServerDied as e:
        print(f"harness: {e}", file=sys.stderr)
        sys.exit(1)
