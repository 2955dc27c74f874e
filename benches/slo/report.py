#!/usr/bin/env python3
"""The report of `make bench-slo` (benches/slo/run.sh): tables per phase, the targets of issue
14 and OUT/slo.svg, from what run.sh left in OUT. Python 3 standard library only.

Usage: python3 benches/slo/report.py OUT      (prints markdown; writes OUT/slo.svg, OUT/report.json)

Inputs in OUT:
  meta.json                 SLO, floor, saturation, phases, machine (written by run.sh)
  <server>.requests.csv     loadgen --out: t_s,latency_ms,outcome,status,lag_ms per request
  <server>.budget.csv       loadgen --budget-out: t_s,budget,version,source,controller_state,
                            controller_measured_ms every ~100 ms (empty where absent)
  <server>.summary.json     loadgen's stdout (generator-side figures: peak in-flight, lag)

Definitions (per server and phase, a phase being [start, start + seconds) of scheduled time):
  offered       requests scheduled in the phase / phase seconds (the Poisson draw; the nominal
                rate is in the heading)
  achieved      ok (HTTP 200) answers / phase seconds
  p50/p95/p99   nearest-rank percentiles of the ok answers' latencies, measured by the
                generator from each request's scheduled send time
  429, timeouts, errors (other statuses, connection errors, requests the generator dropped
                over its in-flight cap)
  mean budget   time-weighted mean of the polled live budget over the phase (a polled value
                holds until the next poll; before the first poll, the first poll's value)
  cal. acc.     time-weighted validation accuracy of the calibrated level serving the budget
                (the highest calibrated budget <= it; calibration.json)
  goodput       ok answers within the SLO / phase seconds
  acc. goodput  accuracy-weighted goodput: for each ok answer within the SLO, the calibrated
                accuracy at the budget live when it was sent; summed, / phase seconds
  recovery      (servers whose budget moves) seconds from the start of the last phase until the
                polled budget is back at the operator's budget for good
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

COLORS = {"controller": "#1f77b4", "dense": "#d62728", "floor": "#2ca02c"}
EPS = 1e-9


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest rank, as loadgen's summary (NaN when empty)."""
    if not sorted_values:
        return math.nan
    rank = math.ceil(p / 100.0 * len(sorted_values))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


class Calibration:
    def __init__(self, path: Path):
        table = json.loads(path.read_text())["budgets"]
        self.levels = sorted((float(r["budget"]), float(r["validation_accuracy"])) for r in table)

    def accuracy(self, budget: float | None) -> float | None:
        """Validation accuracy of the level that serves `budget` (highest level <= it)."""
        if budget is None:
            return None
        best = None
        for level, acc in self.levels:
            if level <= budget + EPS:
                best = acc
        return best


class BudgetTrace:
    """The polled live budget as a step function of time."""

    def __init__(self, path: Path):
        self.points: list[tuple[float, float | None, str]] = []
        if path.exists():
            with path.open() as f:
                for row in csv.DictReader(f):
                    b = row.get("budget") or ""
                    self.points.append((float(row["t_s"]), float(b) if b else None, row.get("source") or ""))
        self.times = [p[0] for p in self.points]

    def at(self, t: float) -> float | None:
        if not self.points:
            return None
        lo, hi = 0, len(self.times)  # last index with time <= t
        while lo < hi:
            mid = (lo + hi) // 2
            if self.times[mid] <= t:
                lo = mid + 1
            else:
                hi = mid
        return self.points[max(lo - 1, 0)][1]

    def segments(self, a: float, b: float):
        """(duration, budget) pieces covering [a, b)."""
        if not self.points or b <= a:
            return
        edges = [a] + [t for t in self.times if a < t < b] + [b]
        for x, y in zip(edges, edges[1:]):
            yield y - x, self.at(x)

    def mean(self, a: float, b: float, f=lambda v: v) -> float | None:
        total = weight = 0.0
        for dt, budget in self.segments(a, b):
            value = f(budget) if budget is not None else None
            if value is not None:
                total += dt * value
                weight += dt
        return total / weight if weight > 0 else None

    def recovery(self, start: float, end: float, target: float) -> float | None:
        """Seconds after `start` until the budget is back at `target` for the rest of [start, end];
        None if it is not back by the last poll."""
        inside = [p for p in self.points if start <= p[0] < end]
        if not inside:
            return None
        low = [p[0] for p in inside if p[1] is None or p[1] < target - EPS]
        if not low:
            before = self.at(start)
            if before is not None and before >= target - EPS:
                return 0.0
            return inside[0][0] - start
        after = [p[0] for p in inside if p[0] > low[-1]]
        return after[0] - start if after else None


def clean(v):
    """NaN to None, recursively (JSON has no NaN)."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [clean(x) for x in v]
    return v


def read_requests(path: Path) -> list[tuple[float, float, str]]:
    rows = []
    with path.open() as f:
        for row in csv.DictReader(f):
            lat = row["latency_ms"]
            rows.append((float(row["t_s"]), float(lat) if lat else math.nan, row["outcome"]))
    return rows


def phase_stats(requests, trace: BudgetTrace, cal: Calibration, a: float, b: float, slo: float) -> dict:
    seconds = b - a
    part = [r for r in requests if a <= r[0] < b]
    ok = sorted(r[1] for r in part if r[2] == "ok")
    count = lambda o: sum(1 for r in part if r[2] == o)  # noqa: E731
    within = [r for r in part if r[2] == "ok" and r[1] <= slo]
    weighted = sum(cal.accuracy(trace.at(r[0])) or 0.0 for r in within)
    return {
        "start_s": a,
        "seconds": seconds,
        "scheduled": len(part),
        "offered_per_s": len(part) / seconds,
        "achieved_per_s": len(ok) / seconds,
        "p50_ms": percentile(ok, 50),
        "p95_ms": percentile(ok, 95),
        "p99_ms": percentile(ok, 99),
        "ok": len(ok),
        "rejected": count("rejected"),
        "timeout": count("timeout"),
        "error": count("error"),
        "dropped_by_client": count("dropped_by_client"),
        "mean_budget": trace.mean(a, b),
        "calibrated_accuracy": trace.mean(a, b, cal.accuracy),
        "min_budget": min((p[1] for p in trace.points if a <= p[0] < b and p[1] is not None), default=None),
        "goodput_per_s": len(within) / seconds,
        "accuracy_goodput_per_s": weighted / seconds,
    }


def p99_windows(requests, total: float, width: float = 1.0) -> list[tuple[float, float]]:
    """(window middle, p99 of the ok latencies of requests scheduled in the window)."""
    buckets: list[list[float]] = [[] for _ in range(math.ceil(total / width))]
    for t, lat, outcome in requests:
        k = int(t // width)
        if outcome == "ok" and 0 <= k < len(buckets):
            buckets[k].append(lat)
    return [((k + 0.5) * width, percentile(sorted(v), 99) if v else math.nan) for k, v in enumerate(buckets)]


def svg(meta: dict, traces: dict, windows: dict, bounds: list[float], out: Path) -> None:
    W, left, right, top, panel, gap = 960, 70, 150, 40, 240, 60
    plot_w = W - left - right
    H = top + 2 * panel + gap + 50
    total = bounds[-1]
    slo = meta["slo_ms"]
    x = lambda t: left + plot_w * min(max(t, 0.0), total) / total  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{left}" y="20" font-size="14">sluice bench-slo: live budget and p99 latency '
             f'(SLO {slo:.2f} ms, floor {meta["floor"]}, saturation {meta["saturation_per_s"]:.0f} req/s)</text>']

    def frame(y0: float, label: str, ticks: list[tuple[float, str]]):
        parts.append(f'<rect x="{left}" y="{y0}" width="{plot_w}" height="{panel}" fill="none" stroke="#888"/>')
        parts.append(f'<text x="18" y="{y0 + panel / 2}" transform="rotate(-90 18 {y0 + panel / 2})" '
                     f'text-anchor="middle">{label}</text>')
        for yy, text in ticks:
            parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#eee"/>')
            parts.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{text}</text>')
        for i, t in enumerate(bounds):
            parts.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{y0}" y2="{y0 + panel}" '
                         f'stroke="#bbb" stroke-dasharray="3,3"/>')
            if y0 == top and i < len(bounds) - 1:
                rate = meta["phases"][i]["rate"]
                parts.append(f'<text x="{(x(t) + x(bounds[i + 1])) / 2:.1f}" y="{y0 - 6}" text-anchor="middle" '
                             f'fill="#666">{meta["phases"][i]["label"]} ({rate:.0f}/s)</text>')

    # Budget panel, 0..1.
    y_budget = lambda b: top + panel * (1 - b / 1.05)  # noqa: E731
    frame(top, "live budget", [(y_budget(v), f"{v:.1f}") for v in (0, 0.2, 0.4, 0.6, 0.8, 1.0)])
    for name, trace in traces.items():
        pts, prev = [], None
        for t, b, _ in trace.points:
            if b is None:
                continue
            if prev is not None:
                pts.append(f"{x(t):.1f},{y_budget(prev):.1f}")
            pts.append(f"{x(t):.1f},{y_budget(b):.1f}")
            prev = b
        if prev is not None:
            pts.append(f"{x(total):.1f},{y_budget(prev):.1f}")
        if pts:
            parts.append(f'<polyline fill="none" stroke="{COLORS.get(name, "#000")}" stroke-width="1.5" '
                         f'points="{" ".join(pts)}"/>')

    # p99 panel, log scale.
    y1 = top + panel + gap
    values = [v for w in windows.values() for _, v in w if not math.isnan(v) and v > 0] + [slo]
    lo = 10 ** math.floor(math.log10(min(values)))
    hi = 10 ** math.ceil(math.log10(max(values)))
    if hi <= lo:
        hi = lo * 10
    y_lat = lambda v: y1 + panel * (1 - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)))  # noqa: E731
    ticks, d = [], lo
    while d <= hi * 1.0001:
        for m in (1, 2, 5):
            if lo <= m * d <= hi * 1.0001:
                ticks.append((y_lat(m * d), f"{m * d:g}"))
        d *= 10
    frame(y1, "p99 latency per 1 s (ms, log)", ticks)
    for name, w in windows.items():
        runs, cur = [], []
        for t, v in w:
            if math.isnan(v) or v <= 0:
                if cur:
                    runs.append(cur)
                cur = []
            else:
                cur.append(f"{x(t):.1f},{y_lat(v):.1f}")
        if cur:
            runs.append(cur)
        for pts in runs:
            parts.append(f'<polyline fill="none" stroke="{COLORS.get(name, "#000")}" stroke-width="1.5" '
                         f'points="{" ".join(pts)}"/>')
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y_lat(slo):.1f}" y2="{y_lat(slo):.1f}" '
                 f'stroke="black" stroke-width="1.5" stroke-dasharray="8,4"/>')
    parts.append(f'<text x="{left + plot_w + 6}" y="{y_lat(slo) + 4:.1f}">SLO {slo:.2f} ms</text>')
    # Time axis and legend.
    yb = y1 + panel
    step = max(1, round(total / 12 / 5) * 5) if total >= 30 else max(1, round(total / 10))
    t = 0.0
    while t <= total + EPS:
        parts.append(f'<text x="{x(t):.1f}" y="{yb + 16}" text-anchor="middle">{t:g}</text>')
        t += step
    parts.append(f'<text x="{left + plot_w / 2}" y="{yb + 36}" text-anchor="middle">seconds since the start '
                 f'(scheduled send time)</text>')
    for i, name in enumerate(traces):
        yy = top + 20 + 20 * i
        parts.append(f'<line x1="{left + plot_w + 10}" x2="{left + plot_w + 34}" y1="{yy}" y2="{yy}" '
                     f'stroke="{COLORS.get(name, "#000")}" stroke-width="2"/>')
        parts.append(f'<text x="{left + plot_w + 40}" y="{yy + 4}">{name}</text>')
    parts.append("</svg>")
    out.write_text("\n".join(parts) + "\n")


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    meta = json.loads((out / "meta.json").read_text())
    cal = Calibration(Path(meta["calibration"]))
    slo, operator = float(meta["slo_ms"]), float(meta.get("operator_budget", 1.0))
    phases = meta["phases"]
    bounds = [0.0]
    for p in phases:
        bounds.append(bounds[-1] + float(p["seconds"]))
    servers = [s for s in meta["servers"] if (out / f"{s}.requests.csv").exists()]

    print("# sluice bench-slo (issue 14)\n")
    print(f"- commit `{meta.get('commit', '?')}`, machine: {meta.get('machine', '?')}, {meta.get('nproc', '?')} cores")
    if "serve_args" not in meta:
        setup = ["serve flags not recorded (a run before they were)"]
    else:
        setup = [f"serve flags `{meta['serve_args']}`" if meta["serve_args"] else "default serve flags"]
    if meta.get("server_cpus") or meta.get("loadgen_cpus"):
        setup.append(f"servers on CPUs {meta.get('server_cpus') or 'any'}, "
                     f"load generator on CPUs {meta.get('loadgen_cpus') or 'any'}")
    print(f"- {'; '.join(setup)}")
    print(f"- dense batch-1 latency (closed loop, concurrency 1, median): {meta['b1_ms']:.3f} ms; "
          f"**SLO p99 = {slo:.3f} ms** ({meta.get('slo_factor', 4)}×)")
    print(f"- dense saturation throughput (closed loop, concurrency {meta.get('sat_concurrency', '?')}): "
          f"{meta['saturation_per_s']:.1f} req/s")
    print(f"- floor budget {meta['floor']} (calibrated accuracy {cal.accuracy(float(meta['floor'])):.4f}; dense "
          f"{cal.accuracy(1.0):.4f}); operator budget {operator}")
    print(f"- schedule (seed {meta.get('seed')}): "
          + ", ".join(f"{p['label']} = {p['rate']:.0f} req/s for {p['seconds']:g} s" for p in phases))
    print(f"- servers: {', '.join(servers)}\n")

    stats, traces, windows, recovery = {}, {}, {}, {}
    for s in servers:
        requests = read_requests(out / f"{s}.requests.csv")
        trace = BudgetTrace(out / f"{s}.budget.csv")
        traces[s] = trace
        windows[s] = p99_windows(requests, bounds[-1])
        stats[s] = [phase_stats(requests, trace, cal, a, b, slo) for a, b in zip(bounds, bounds[1:])]
        recovery[s] = trace.recovery(bounds[-2], bounds[-1], operator) if len(phases) > 1 else None

    header = ("| server | offered /s | achieved /s | p50 ms | p95 ms | p99 ms | 429 | timeouts | errors+dropped "
              "| mean budget | cal. acc. | goodput /s | acc. goodput /s |")
    for i, p in enumerate(phases):
        print(f"## Phase {i + 1}: {p['label']} saturation, {p['rate']:.0f} req/s, "
              f"{bounds[i]:g}–{bounds[i + 1]:g} s\n")
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for s in servers:
            x = stats[s][i]
            p99 = fmt(x["p99_ms"], ".2f")
            if not math.isnan(x["p99_ms"]) and x["p99_ms"] > slo:
                p99 += " ✗"
            print(f"| {s} | {x['offered_per_s']:.1f} | {x['achieved_per_s']:.1f} | {fmt(x['p50_ms'], '.2f')} "
                  f"| {fmt(x['p95_ms'], '.2f')} | {p99} | {x['rejected']} | {x['timeout']} "
                  f"| {x['error'] + x['dropped_by_client']} | {fmt(x['mean_budget'], '.3f')} "
                  f"| {fmt(x['calibrated_accuracy'], '.4f')} | {x['goodput_per_s']:.1f} "
                  f"| {x['accuracy_goodput_per_s']:.1f} |")
        print()

    print("## Accuracy-weighted goodput (correct answers/s within the SLO)\n")
    cols = [f"phase {i + 1} ({p['label']})" for i, p in enumerate(phases)] + ["whole run"]
    print("| server | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for s in servers:
        whole = sum(x["accuracy_goodput_per_s"] * x["seconds"] for x in stats[s]) / bounds[-1]
        print(f"| {s} | " + " | ".join(f"{x['accuracy_goodput_per_s']:.1f}" for x in stats[s]) + f" | {whole:.1f} |")
    print()

    print("## Generator\n")
    for s in servers:
        try:
            g = json.loads((out / f"{s}.summary.json").read_text())
            lag = g.get("send_lag_ms", {})
            print(f"- {s}: peak in flight {g.get('peak_inflight')} (cap {g.get('max_inflight')}), send lag "
                  f"p99 {fmt(lag.get('p99'), '.2f')} ms, max {fmt(lag.get('max'), '.2f')} ms; "
                  f"{g.get('polls')} budget polls ({g.get('poll_failures')} failed)")
        except (OSError, ValueError):
            print(f"- {s}: no generator summary")
    print()

    # Targets (issue 14); each needs the servers it compares.
    hi = max(range(len(phases)), key=lambda i: phases[i]["rate"])
    lows = [i for i in range(len(phases)) if i != hi]
    checks = []

    def unserved(x):
        return x["rejected"] + x["timeout"] + x["error"] + x["dropped_by_client"]

    if "controller" in stats:
        c = stats["controller"][hi]
        checks.append((f"controller, {phases[hi]['label']} phase: p99 {fmt(c['p99_ms'], '.2f')} ms ≤ SLO "
                       f"{slo:.2f} ms and nothing rejected ({c['rejected']} × 429, {c['timeout']} timeouts, "
                       f"{c['error'] + c['dropped_by_client']} errors)",
                       not math.isnan(c["p99_ms"]) and c["p99_ms"] <= slo and unserved(c) == 0))
        first = stats["controller"][lows[0]] if lows else None
        if first is not None and lows[0] < hi:
            mb = first["min_budget"]
            checks.append((f"controller, phase {lows[0] + 1} ({phases[lows[0]]['label']}): at the operator's budget "
                           f"{operator} throughout (lowest polled {fmt(mb, '.3f')})",
                           mb is not None and mb >= operator - EPS))
        r = recovery["controller"]
        back = f"back after {r:.1f} s" if r is not None else "not back by the end of the run"
        checks.append((f"controller: budget back at the operator's {operator} within 5 s of the load drop ({back})",
                       r is not None and r <= 5.0))
    if "dense" in stats:
        d = stats["dense"][hi]
        checks.append((f"fixed dense, {phases[hi]['label']} phase: misses the SLO (p99 {fmt(d['p99_ms'], '.2f')} ms) "
                       f"or rejects ({unserved(d)} unserved)",
                       (not math.isnan(d["p99_ms"]) and d["p99_ms"] > slo) or unserved(d) > 0))
    if checks:
        print("## Targets\n")
        for text, ok in checks:
            print(f"- [{'x' if ok else ' '}] {'PASS' if ok else 'FAIL'}: {text}")
        print()
    svg(meta, traces, windows, bounds, out / "slo.svg")
    print(f"Plot: {out / 'slo.svg'}")
    report = {"meta": meta, "servers": {s: {"phases": stats[s], "recovery_s": recovery[s]} for s in servers},
              "targets": [{"check": t, "pass": ok} for t, ok in checks]}
    (out / "report.json").write_text(json.dumps(clean(report), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
