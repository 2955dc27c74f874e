"""A real Prometheus (Debian's package) scraping a real sluice on loopback: traffic at two
budgets, then the Prometheus HTTP API must report the skipped-FLOP fraction the responses
reported (within 1%), and it must change with the budget. Also `promtool check metrics` on
a real scrape, and the scrape time with 10 models loaded.

Run by `make test`:  .venv/bin/python tests/python/test_prometheus.py [path/to/sluice]
Ends with "N passed, N failed"; exits non-zero on failure.
"""
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import numpy as np
import tritonclient.http as th

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_clients import Server, run_tests, sh  # noqa: E402

MODEL = "gated"


def write_calibration(model_dir):
    def point(c, b, f):
        return {"channel_threshold": c, "block_threshold": b, "exit_threshold": 1.0,
                "validation_accuracy": 0.5, "flop_fraction": f}
    budgets = [{"budget": 0.3, **point(1.0, 1.0, 0.3)}, {"budget": 0.6, **point(0.5, 0.5, 0.6)},
               {"budget": 1.0, **point(0.0, 0.0, 1.0)}]
    table = {"model": MODEL, "split": "validation", "images": 0, "channel_mode": "slice",
             "budgets": budgets, "frontier": [{k: v for k, v in b.items() if k != "budget"} for b in budgets]}
    with open(os.path.join(model_dir, "calibration.json"), "w") as f:
        json.dump(table, f)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url, method="GET", body=None):
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


class Prometheus:
    def __init__(self, target, workdir):
        self.port = free_port()
        config = os.path.join(workdir, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    f"scrape_configs:\n  - job_name: sluice\n    static_configs:\n      - targets: ['{target}']\n")
        self.log = open(os.path.join(workdir, "prometheus.log"), "w")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={os.path.join(workdir, 'tsdb')}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=self.log)
        self.api = f"http://127.0.0.1:{self.port}/api/v1"
        self.wait_for(lambda: self.up())

    def up(self):
        try:
            r = self.query('up{job="sluice"}')
            return bool(r) and r[0]["value"][1] == "1"
        except OSError:
            return False

    def query(self, expr):
        url = f"{self.api}/query?" + urllib.parse.urlencode({"query": expr})
        return http_json(url)["data"]["result"]

    def scalar(self, expr):
        r = self.query(expr)
        return float(r[0]["value"][1]) if r else None

    @staticmethod
    def wait_for(condition, limit=60.0):
        """Waits for Prometheus to observe something (bounded; not a fixed sleep)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.2)
        raise AssertionError("Prometheus did not observe the expected state in time")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def traffic(server, requests, rng):
    """Sends requests; returns (skipped, dense) FLOPs as the responses report them."""
    c = th.InferenceServerClient(server.http)
    skipped = dense = 0
    for _ in range(requests):
        x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
        i = th.InferInput("input", x.shape, "FP32")
        i.set_data_from_numpy(x)
        r = c.infer(MODEL, [i])
        per_input = r.as_numpy("sluice_flops").ravel()
        d = r.get_response()["parameters"]["sluice_flops_dense"] // len(per_input)
        skipped += int(sum(max(0, d - int(e)) for e in per_input))
        dense += d * len(per_input)
    return skipped, dense


def set_budget(server, budget):
    http_json(f"http://{server.admin}/v2/models/{MODEL}/gating", "PATCH", {"budget": budget, "actor": "prometheus-test"})


def test_prometheus_sees_the_savings_the_responses_report(server, prom):
    rng = np.random.default_rng(0)
    fractions = []
    last = (0, 0)
    total_skipped = total_dense = 0
    for budget in (0.6, 0.3):
        set_budget(server, budget)
        s, d = traffic(server, 30, rng)
        total_skipped += s
        total_dense += d
        # Wait until Prometheus has scraped the counters after this traffic.
        prom.wait_for(lambda: prom.scalar(f'sluice_flops_dense_total{{model="{MODEL}"}}') == total_dense)
        skipped_now = prom.scalar(f'sluice_flops_total{{model="{MODEL}",kind="skipped"}}')
        dense_now = prom.scalar(f'sluice_flops_dense_total{{model="{MODEL}"}}')
        window = (skipped_now - last[0]) / (dense_now - last[1])
        last = (skipped_now, dense_now)
        reported = s / d
        assert abs(window - reported) <= 0.01 * max(reported, 1e-9), (budget, window, reported)
        fractions.append(window)
        budget_gauge = prom.scalar(f'sluice_policy_budget{{model="{MODEL}"}}')
        assert budget_gauge == budget, budget_gauge
    assert fractions[1] > fractions[0] + 0.05, f"savings did not change with the budget: {fractions}"
    # The dashboard's expression over the whole run agrees with the responses too.
    saved = prom.scalar(f'sum(sluice_flops_total{{model="{MODEL}",kind="skipped"}}) / sum(sluice_flops_dense_total{{model="{MODEL}"}})')
    assert abs(saved - total_skipped / total_dense) <= 0.01 * total_skipped / total_dense


def test_promtool_accepts_a_real_scrape(server, prom):
    text = urllib.request.urlopen(f"http://{server.metrics}/metrics").read()
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()


def test_scrape_with_ten_models_is_fast(server, prom):
    repo = tempfile.mkdtemp(prefix="sluice-ten-")
    for i in range(10):
        sh("model", "init", os.path.join(repo, f"m{i}"), "--name", f"m{i}", "--gates", "channel,block,exits", "--seed", str(i))
    ten = Server(repo)
    try:
        c = th.InferenceServerClient(ten.http)
        x = np.zeros((2, 1, 28, 28), np.float32)
        for i in range(10):
            inp = th.InferInput("input", x.shape, "FP32")
            inp.set_data_from_numpy(x)
            c.infer(f"m{i}", [inp])
        url = f"http://{ten.metrics}/metrics"
        times = []
        for _ in range(60):
            t0 = time.perf_counter()
            body = urllib.request.urlopen(url).read()
            times.append((time.perf_counter() - t0) * 1e3)
        median = statistics.median(times)
        print(f"    scrape with 10 models: median {median:.2f} ms over 60 scrapes, {len(body)} bytes")
        out = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
        assert out.returncode == 0, out.stdout.decode()
    finally:
        ten.stop()
        shutil.rmtree(repo, ignore_errors=True)


def main():
    repo = tempfile.mkdtemp(prefix="sluice-prom-")
    sh("model", "init", os.path.join(repo, MODEL), "--name", MODEL, "--gates", "channel,block", "--seed", "7")
    write_calibration(os.path.join(repo, MODEL))
    server = Server(repo)
    prom = Prometheus(server.metrics, repo)
    try:
        failed = run_tests([v for k, v in globals().items() if k.startswith("test_")], server, prom)
    finally:
        prom.stop()
        server.stop()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
