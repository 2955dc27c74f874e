"""Triton's own clients against a real sluice: tritonclient (HTTP binary and JSON, gRPC),
perf_analyzer concurrency sweeps over HTTP and gRPC, and a bad-input suite.

Run by `make test` with the project venv (deploy/setup-test-env.sh):
    .venv/bin/python tests/python/test_clients.py [path/to/sluice]
Prints one line per test and ends with "N passed, N failed"; exits non-zero on failure.
"""
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import traceback

import grpc
import numpy as np
import tritonclient.grpc as tg
import tritonclient.http as th
from PIL import Image
from tritonclient.utils import InferenceServerException

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLUICE = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "debug", "sluice")
PERF = os.path.join(ROOT, ".venv", "bin", "perf_analyzer")
MODEL = "gated"


def sh(*args):
    out = subprocess.run([SLUICE, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


class Server:
    def __init__(self, repo):
        self.log = open(os.path.join(repo, "server.log"), "w")
        self.proc = subprocess.Popen(
            [SLUICE, "serve", "--model-repository", repo, "--address", "127.0.0.1",
             "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--admin-port", "0"],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        for line in self.proc.stdout:
            if line.startswith("sluice ready:"):
                parts = dict(p.split("=", 1) for p in line.split()[2:])
                self.http, self.grpc, self.metrics = parts["http"], parts["grpc"], parts["metrics"]
                self.admin = parts.get("admin")
                return
        raise RuntimeError("sluice serve exited before it was ready")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def make_repo():
    repo = tempfile.mkdtemp(prefix="sluice-clients-")
    sh("model", "init", os.path.join(repo, MODEL), "--name", MODEL, "--gates", "channel,block,exits", "--seed", "5")
    sh("model", "init", os.path.join(repo, "images"), "--name", "images", "--image", "--seed", "6")
    return repo


def batch(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 1, 28, 28)).astype(np.float32)


def reference(repo, x, budget=None):
    path = os.path.join(repo, "input.json")
    with open(path, "w") as f:
        json.dump({"shape": list(x.shape), "data": x.ravel().tolist()}, f)
    args = ["model", "predict", os.path.join(repo, MODEL), "--input", path]
    if budget is not None:
        args += ["--budget", str(budget)]
    return np.array(json.loads(sh(*args))["logits"], dtype=np.float32)


def close(a, b):
    return a.shape == b.shape and np.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_readiness_and_metadata(s, repo):
    h, g = th.InferenceServerClient(s.http), tg.InferenceServerClient(s.grpc)
    assert h.is_server_live() and h.is_server_ready() and h.is_model_ready(MODEL)
    assert g.is_server_live() and g.is_server_ready() and g.is_model_ready(MODEL)
    meta = h.get_model_metadata(MODEL)
    assert meta["inputs"][0]["shape"] == [-1, 1, 28, 28], meta
    assert g.get_model_metadata(MODEL).outputs[0].name == "logits"
    assert h.get_model_config(MODEL)["max_batch_size"] == 32
    assert g.get_model_config(MODEL).config.input[0].dims == [1, 28, 28]
    assert "binary_tensor_data" in h.get_server_metadata()["extensions"]


def test_http_binary_json_and_grpc_equal_the_engine(s, repo):
    x = batch(4, seed=1)
    expected = reference(repo, x)
    h, g = th.InferenceServerClient(s.http), tg.InferenceServerClient(s.grpc)
    for binary in (True, False):
        i = th.InferInput("input", x.shape, "FP32")
        i.set_data_from_numpy(x, binary_data=binary)
        out = th.InferRequestedOutput("logits", binary_data=binary)
        r = h.infer(MODEL, [i], outputs=[out])
        assert close(r.as_numpy("logits"), expected), f"http binary={binary}"
        params = r.get_response()["parameters"]
        assert params["sluice_flops_executed"] >= params["sluice_flops_dense"] > 0
    gi = tg.InferInput("input", x.shape, "FP32")
    gi.set_data_from_numpy(x)
    r = g.infer(MODEL, [gi])
    assert close(r.as_numpy("logits"), expected), "grpc"
    assert r.as_numpy("sluice_flops").shape == (4, 1)
    assert r.get_response().parameters["sluice_policy_version"].int64_param == 1


def test_classification_and_per_request_gating(s, repo):
    x = batch(2, seed=2)
    h = th.InferenceServerClient(s.http)
    i = th.InferInput("input", x.shape, "FP32")
    i.set_data_from_numpy(x)
    r = h.infer(MODEL, [i], outputs=[th.InferRequestedOutput("logits", class_count=3)])
    top = r.as_numpy("logits")
    assert top.shape == (2, 3)
    best = np.argmax(reference(repo, x), axis=1)
    assert [int(t.decode().split(":")[1]) for t in top[:, 0]] == list(best)
    r = h.infer(MODEL, [i], parameters={"sluice_block_threshold": 1.0, "sluice_channel_threshold": 1.0})
    p = r.get_response()["parameters"]
    assert p["sluice_flops_executed"] < p["sluice_flops_dense"] and p["sluice_policy_override"] is True


def expect_error(fn, status_part, message_part):
    try:
        fn()
    except InferenceServerException as e:
        text = f"{e.status()} {e.message()}"
        assert status_part in text and message_part in text, text
        return
    raise AssertionError(f"expected an error containing {message_part!r}")


def test_bad_inputs_through_the_clients(s, repo):
    h, g = th.InferenceServerClient(s.http), tg.InferenceServerClient(s.grpc)
    x = batch(1)[:, :, :, :27].copy()
    for client, mod, status in ((h, th, "400"), (g, tg, "INVALID_ARGUMENT")):
        i = mod.InferInput("input", x.shape, "FP32")
        i.set_data_from_numpy(x)
        expect_error(lambda: client.infer(MODEL, [i]), status, "shape [1, 1, 28, 27] given")
        j = mod.InferInput("input", [1, 1, 28, 28], "FP64")
        j.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float64))
        expect_error(lambda: client.infer(MODEL, [j]), status, "datatype FP64 given")
        k = mod.InferInput("image", [1, 1], "BYTES")
        k.set_data_from_numpy(np.array([[b"not an image"]], dtype=object))
        expect_error(lambda: client.infer("images", [k]), status, "not a PNG or JPEG")
    expect_error(lambda: h.infer("nope", []), "404", "unknown model")
    # Malformed protobuf on the wire.
    channel = grpc.insecure_channel(s.grpc)
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    try:
        call(b"\x0a\xff\xff\xff\x01\x02")
        raise AssertionError("malformed protobuf accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed protobuf" in e.details(), e
    # Still healthy and correct.
    assert h.is_server_ready()
    i = th.InferInput("input", [1, 1, 28, 28], "FP32")
    i.set_data_from_numpy(batch(1, seed=3))
    assert close(h.infer(MODEL, [i]).as_numpy("logits"), reference(repo, batch(1, seed=3)))


def test_images_through_tritonclient(s, repo):
    img = Image.fromarray((np.arange(28 * 28) % 255).reshape(28, 28).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    h = th.InferenceServerClient(s.http)
    k = th.InferInput("image", [1, 1], "BYTES")
    k.set_data_from_numpy(np.array([[buf.getvalue()]], dtype=object))
    r = h.infer("images", [k])
    assert r.as_numpy("logits").shape == (1, 10)


def perf(s, protocol, csv_path):
    url = s.http if protocol == "http" else s.grpc
    cmd = [PERF, "-m", MODEL, "-u", url, "-i", protocol, "--concurrency-range", "1:4:1",
           "--measurement-mode", "count_windows", "--measurement-request-count", "40",
           "--stability-percentage", "1000", "--max-trials", "4", "-f", csv_path]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "error" not in text.lower(), text
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    # perf_analyzer orders the CSV by throughput, not by concurrency: every level, once.
    assert sorted(int(r["Concurrency"]) for r in rows) == [1, 2, 3, 4], rows
    assert all(float(r["Inferences/Second"]) > 0 for r in rows)


def test_perf_analyzer_sweeps_over_http_and_grpc_without_errors(s, repo):
    before = server_errors(s)
    with tempfile.TemporaryDirectory() as d:
        perf(s, "http", os.path.join(d, "http.csv"))
        perf(s, "grpc", os.path.join(d, "grpc.csv"))
    assert server_errors(s) == before, "perf_analyzer caused failed requests"


def server_errors(s):
    import urllib.request
    text = urllib.request.urlopen(f"http://{s.metrics}/metrics").read().decode()
    total = 0
    for line in text.splitlines():
        if line.startswith("sluice_requests_total") and ('outcome="server_error"' in line or 'outcome="client_error"' in line) \
                and f'model="{MODEL}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def run_tests(tests, *args):
    """Runs each test with `args`, prints a line per test and the summary; returns failures."""
    passed = failed = 0
    for t in tests:
        try:
            t(*args)
            passed += 1
            print(f"test {t.__name__} ... ok", flush=True)
        except Exception:
            failed += 1
            print(f"test {t.__name__} ... FAILED", flush=True)
            traceback.print_exc()
    print(f"{passed} passed, {failed} failed")
    return failed


def main():
    repo = make_repo()
    server = Server(repo)
    try:
        failed = run_tests([v for k, v in globals().items() if k.startswith("test_")], server, repo)
    finally:
        server.stop()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
