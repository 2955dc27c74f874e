"""Fleet-wide live tuning (issue 15): three sluice processes behind a real haproxy (Debian's),
all following one policy file laid out as Kubernetes mounts a ConfigMap (`policy.toml` ->
`..data/policy.toml`, `..data` -> a timestamped folder, swapped atomically). While a client
sends requests through haproxy the whole time, a new file version must reach all three
replicas within 2 s (the default poll interval is 0.5 s, and a change is applied once two
reads agree: 0.5–1 s), no request may fail, and every
response after the change must carry the new policy version. Also: `sluice ctl` addressing
the three replicas reports each one's version, the control API refuses policy changes while
a file is followed (409 naming the file), and an invalid file or one whose version was not
raised is refused without touching the live policies.

Run by `make test`:  .venv/bin/python tests/python/test_fleet.py [path/to/sluice]
Ends with "N passed, N failed"; exits non-zero on failure.
"""
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_clients import SLUICE, run_tests, sh  # noqa: E402
from test_prometheus import free_port, write_calibration  # noqa: E402

MODEL = "gated"
PROPAGATION_LIMIT_S = 2.0
BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                               "data": [0.1] * 784}]}).encode()


class ConfigMapDir:
    """A folder laid out and updated the way the kubelet updates a mounted ConfigMap."""

    def __init__(self, root):
        self.root = root
        self.generation = 0
        os.makedirs(root)

    @property
    def path(self):
        return os.path.join(self.root, "policy.toml")

    def write(self, text):
        self.sha256 = hashlib.sha256(text.encode()).hexdigest()
        self.generation += 1
        data = os.path.join(self.root, f"..2026_12_03_{self.generation:04d}")
        os.makedirs(data)
        with open(os.path.join(data, "policy.toml"), "w") as f:
            f.write(text)
        tmp = os.path.join(self.root, "..data_tmp")
        os.symlink(os.path.basename(data), tmp)
        os.replace(tmp, os.path.join(self.root, "..data"))  # the atomic swap
        if not os.path.islink(self.path):
            os.symlink("..data/policy.toml", self.path)


class Replica:
    START_LIMIT_S = 120

    def __init__(self, repo, policy_file, workdir, i):
        self.log = open(os.path.join(workdir, f"replica-{i}.log"), "w")
        self.proc = subprocess.Popen(
            [SLUICE, "serve", "--model-repository", repo, "--address", "127.0.0.1", "--http-port", "0",
             "--grpc-port", "0", "--metrics-port", "0", "--admin-port", "0", "--engine-threads", "1",
             "--policy-file", policy_file],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        # A server that never gets ready is killed, which ends the read below.
        watchdog = threading.Timer(self.START_LIMIT_S, self.proc.kill)
        watchdog.start()
        try:
            for line in self.proc.stdout:
                if line.startswith("sluice ready:"):
                    parts = dict(p.split("=", 1) for p in line.split()[2:])
                    self.http, self.admin, self.metrics = parts["http"], parts["admin"], parts["metrics"]
                    break
            else:
                raise RuntimeError(f"replica {i} exited or hung before it was ready (see {self.log.name})")
        finally:
            watchdog.cancel()
        # Keep draining stdout so the server never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def gating(self):
        with urllib.request.urlopen(f"http://{self.admin}/v2/models/{MODEL}/gating", timeout=10) as r:
            return json.loads(r.read())

    def metric(self, name):
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise AssertionError(f"{name} not exported")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


class Haproxy:
    def __init__(self, backends, workdir):
        self.port = free_port()
        config = os.path.join(workdir, "haproxy.cfg")
        servers = "\n".join(f"    server r{i} {b} check inter 1s" for i, b in enumerate(backends))
        with open(config, "w") as f:
            f.write(f"""global
    maxconn 256
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-server-close
frontend sluice
    bind 127.0.0.1:{self.port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /v2/health/ready
{servers}
""")
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        sh_check = subprocess.run([binary, "-c", "-f", config], capture_output=True, text=True)
        assert sh_check.returncode == 0, sh_check.stdout + sh_check.stderr
        self.log = open(os.path.join(workdir, "haproxy.log"), "w")
        self.proc = subprocess.Popen([binary, "-db", "-f", config], stdout=self.log, stderr=self.log)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    status, _ = self.infer()
                    if status == 200:
                        return
                except OSError:
                    pass
                # (the port was free when chosen; another process taking it meanwhile shows here)
                assert self.proc.poll() is None, f"haproxy exited (see {self.log.name})"
                assert time.monotonic() < deadline, "haproxy did not forward a request within 30 s"
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def infer(self):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            c.request("POST", f"/v2/models/{MODEL}/infer", body=BODY, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


class Client(threading.Thread):
    """Sends requests through haproxy back to back until stopped; records each outcome."""

    def __init__(self, proxy):
        super().__init__(daemon=True)
        self.proxy, self.stopping, self.results = proxy, threading.Event(), []

    def run(self):
        while not self.stopping.is_set():
            sent = time.monotonic()
            try:
                status, body = self.proxy.infer()
                version = json.loads(body)["parameters"]["sluice_policy_version"] if status == 200 else None
            except Exception as e:  # a failed request is a result, not a crash of the client
                status, version = repr(e), None
            self.results.append((sent, time.monotonic(), status, version))


def policy(version, budget):
    return f"version = {version}\n\n[models.{MODEL}]\nbudget = {budget}\n"


def wait_for_version(replicas, version, limit_s):
    """Seconds until every replica's live policy has `version` (polled every 20 ms)."""
    start = time.monotonic()
    while True:
        if all(r.gating()["policy"]["version"] == version for r in replicas):
            return time.monotonic() - start
        if time.monotonic() - start > limit_s:
            states = [(r.http, r.gating()["policy"]) for r in replicas]
            raise AssertionError(f"not every replica reached version {version} within {limit_s} s: {states}")
        time.sleep(0.02)


def test_a_file_change_reaches_every_replica_under_load(fleet):
    replicas, proxy, cm = fleet["replicas"], fleet["proxy"], fleet["configmap"]
    for r in replicas:
        g = r.gating()
        assert (g["policy"]["version"], g["policy"]["source"], g["policy"]["budget"]) == (1, "file", 1.0), g
        assert g["policy_file"] == {"path": cm.path, "version": 1, "sha256": cm.sha256}, g
    client = Client(proxy)
    client.start()
    try:
        deadline = time.monotonic() + 30
        while len(client.results) < 30:
            assert time.monotonic() < deadline, "the client made no progress"
            time.sleep(0.05)
        changed = time.monotonic()
        cm.write(policy(2, 0.6))
        took = wait_for_version(replicas, 2, limit_s=10)
        everywhere = time.monotonic()
        # Keep sending, then stop and look at every answer.
        count = len(client.results)
        while len(client.results) < count + 60:
            assert time.monotonic() < deadline + 30, "the client made no progress after the change"
            time.sleep(0.05)
    finally:
        client.stopping.set()
        client.join(timeout=30)
    results = client.results
    failed = [r for r in results if r[2] != 200]
    after = [r for r in results if r[0] > everywhere]
    print(f"    {len(results)} requests, {len(failed)} failed; the change reached all 3 replicas in {took:.3f} s; "
          f"{len(after)} requests sent after that")
    assert not failed, failed[:5]
    assert took <= PROPAGATION_LIMIT_S, f"propagation took {took:.3f} s (limit {PROPAGATION_LIMIT_S} s)"
    assert after and all(r[3] == 2 for r in after), [r for r in after if r[3] != 2][:5]
    assert {r[3] for r in results if r[1] < changed} == {1}, "before the change every answer was version 1"
    for r in replicas:
        g = r.gating()
        assert (g["policy"]["source"], g["policy"]["budget"], g["policy_file"]["version"]) == ("file", 0.6, 2), g
        assert r.metric("sluice_policy_file_version") == 2


def test_ctl_reports_every_replica(fleet):
    urls = ",".join(f"http://{r.admin}" for r in fleet["replicas"])
    out = sh("ctl", "gating", "get", "--model", MODEL, "--url", urls)
    lines = [line for line in out.splitlines() if "version=" in line]
    assert len(lines) == 3 and all("version=2 source=file budget=0.6 policy_file_version=2" in line for line in lines), out
    assert "3 replicas, all at policy version 2; all applied policy file version 2" in out, out


def test_the_control_api_refuses_changes_while_a_file_rules(fleet):
    r = fleet["replicas"][0]
    req = urllib.request.Request(f"http://{r.admin}/v2/models/{MODEL}/gating", method="PATCH",
                                 data=json.dumps({"budget": 0.3}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("a policy change was accepted while following a file")
    except urllib.error.HTTPError as e:
        assert e.code == 409, e.code
        message = json.loads(e.read())["error"]
        assert fleet["configmap"].path in message and "--policy-file" in message, message
    assert r.gating()["policy"]["version"] == 2


def test_invalid_files_are_refused_and_the_live_policy_stays(fleet):
    replicas, cm = fleet["replicas"], fleet["configmap"]
    before = [r.metric("sluice_policy_file_errors_total") for r in replicas]
    for text in (policy(3, 1.7), policy(2, 0.3), "version = 4\n[models.gated]\nbugdet = 0.3\n"):
        cm.write(text)
        # Each replica counts the refusal within a few poll intervals.
        deadline = time.monotonic() + 10
        while not all(r.metric("sluice_policy_file_errors_total") > b for r, b in zip(replicas, before)):
            assert time.monotonic() < deadline, f"a replica did not refuse {text!r}"
            time.sleep(0.05)
        before = [r.metric("sluice_policy_file_errors_total") for r in replicas]
        for r in replicas:
            p = r.gating()["policy"]
            assert (p["version"], p["budget"]) == (2, 0.6), (text, p)
    # A valid file with a raised version is applied again.
    cm.write(policy(5, 1.0))
    wait_for_version(replicas, 5, limit_s=10)
    assert all(r.gating()["policy"]["budget"] == 1.0 for r in replicas)


def main():
    workdir = tempfile.mkdtemp(prefix="sluice-fleet-")
    repo = os.path.join(workdir, "models")
    sh("model", "init", os.path.join(repo, MODEL), "--name", MODEL, "--gates", "channel,block,exits", "--seed", "5")
    write_calibration(os.path.join(repo, MODEL))
    cm = ConfigMapDir(os.path.join(workdir, "policy"))
    cm.write(policy(1, 1.0))
    replicas, proxy = [], None
    try:
        for i in range(3):
            replicas.append(Replica(repo, cm.path, workdir, i))
        proxy = Haproxy([r.http for r in replicas], workdir)
        fleet = {"replicas": replicas, "proxy": proxy, "configmap": cm}
        tests = [test_a_file_change_reaches_every_replica_under_load, test_ctl_reports_every_replica,
                 test_the_control_api_refuses_changes_while_a_file_rules,
                 test_invalid_files_are_refused_and_the_live_policy_stays]
        failed = run_tests(tests, fleet)
    finally:
        if proxy:
            proxy.stop()
        for r in replicas:
            r.stop()
    if not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs kept in {workdir}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
