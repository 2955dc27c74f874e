#!/usr/bin/env python3
"""sluice's dense engine against the runtimes a user could pick instead, on the same weights.

For each case (ResNet-20 1x28x28 at batch 1 and 32, ResNet-50 3x224x224 at batch 1 and 8) this
script makes a model folder with `sluice model init` (seeded random weights, torchvision
parameter names), loads the very same safetensors into PyTorch, and times, in interleaved
rounds (the order rotates every round), each with the same number of intra-op threads:

  sluice            `sluice bench forward` (its engine at dense compute, in its own process),
                    in its default format: --layout onednn (fused oneDNN convolutions on
                    weights packed at load), FP32
  sluice-cl         the same with --layout channels-last (libtorch's own convolutions)
  sluice-bf16       --layout onednn --precision bf16, where the CPU has bf16 instructions
  eager             PyTorch eager, eval mode, the faster of NCHW and channels-last
  torchscript       torch.jit.trace + freeze + optimize_for_inference (BN folded, oneDNN),
                    the faster of NCHW and channels-last
  eager-bf16        PyTorch eager in bf16 (channels-last), where the CPU has bf16 instructions
  onnxruntime       ONNX Runtime (CPU provider, all graph optimisations) on the exported ONNX
  openvino-fp32     OpenVINO on the same ONNX, INFERENCE_PRECISION_HINT=f32
  openvino-default  OpenVINO with its default precision (bf16 where the CPU has AMX/AVX512-BF16)

Before timing, every runtime's logits are compared with PyTorch eager FP32 on the same input
(max |difference| and the largest |logit| are printed; FP32 runtimes must agree within
--tolerance relative to the largest logit, bf16 ones are only reported). Reported per case:
the median over rounds of each round's median latency, and each runtime's time relative to
sluice. The CPU's model name and its vector/matrix flags are printed with the table.

Needs: `make build` (target/release/sluice) and the reference runtimes:
    benches/setup-bench-env.sh      # .cache/bench-venv: torch, onnxruntime, openvino (~4.5 GB)
Run:
    .cache/bench-venv/bin/python benches/pytorch_reference.py [--rounds 5] [--threads 2]
        [--cases resnet20:1,resnet20:32,resnet50:1,resnet50:8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.dont_write_bytecode = True  # no benches/__pycache__ from importing torchmodels
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchmodels import CASES, load_torch_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FLAGS_OF_INTEREST = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]


def cpu_description() -> tuple[str, list[str]]:
    """The CPU's model name, with its family and model numbers where /proc/cpuinfo has them (a
    hypervisor may show only "AMD EPYC": family 25 is Zen 3/4, 26 Zen 5), and its flags."""
    model, flags, ids = platform.processor() or "unknown", set(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and model in ("unknown", "", platform.processor()):
                model = value
            elif key in ("cpu family", "model") and key not in ids:
                ids[key] = value
            elif key == "flags":
                flags |= set(value.split())
    except OSError:
        pass
    if ids:
        model += f" (family {ids.get('cpu family', '?')}, model {ids.get('model', '?')})"
    return model, [f for f in FLAGS_OF_INTEREST if f in flags]


def time_fn(fn, iterations: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


class Runtime:
    """One way of running the network: `prepare` once, then `run(x)` → logits (numpy)."""

    def __init__(self, name: str, fp32: bool = True):
        self.name, self.fp32, self.note = name, fp32, ""


def make_runtimes(arch: str, folder: Path, model: nn.Module, x: np.ndarray, threads: int, work: Path,
                  binary: str, bf16_cpu: bool) -> list:
    xt = torch.from_numpy(x)
    runtimes = []

    def torch_variant(name, module, layout, dtype=torch.float32):
        mf = torch.channels_last if layout == "channels-last" else torch.contiguous_format
        inp = xt.to(dtype=dtype).contiguous(memory_format=mf)
        rt = Runtime(name, fp32=dtype == torch.float32)
        rt.note = layout

        def run():
            with torch.inference_mode():
                return module(inp)
        rt.run = run
        rt.logits = lambda: run().float().numpy()
        return rt

    # Eager and TorchScript: pick the faster layout in a short trial, as a user tuning it would.
    def best(name, make):
        options = [torch_variant(name, make(layout), layout) for layout in ("nchw", "channels-last")]
        trials = [time_fn(o.run, 5, 2) for o in options]
        return options[int(np.argmin(trials))]

    def eager(layout):
        m = load_torch_model(arch, folder)
        return m.to(memory_format=torch.channels_last) if layout == "channels-last" else m

    def scripted(layout):
        m = eager(layout)
        mf = torch.channels_last if layout == "channels-last" else torch.contiguous_format
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(m, xt.contiguous(memory_format=mf))
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        return frozen

    runtimes.append(best("eager", eager))
    runtimes.append(best("torchscript", scripted))
    if bf16_cpu:
        m = load_torch_model(arch, folder).to(memory_format=torch.channels_last, dtype=torch.bfloat16)
        runtimes.append(torch_variant("eager-bf16", m, "channels-last", torch.bfloat16))

    onnx_path = work / f"{arch}.onnx"
    if not onnx_path.exists():
        # The TorchScript-based exporter: deprecated, but it needs no onnxscript rewriting and
        # gives the plain Conv/Relu/Add graph every runtime optimises.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.onnx")
        with torch.no_grad():
            torch.onnx.export(load_torch_model(arch, folder), (xt,), str(onnx_path), input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}},
                              opset_version=17, dynamo=False)
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    rt = Runtime("onnxruntime")
    rt.run = lambda: sess.run(None, {"input": x})[0]
    rt.logits = rt.run
    runtimes.append(rt)

    import openvino as ov
    core = ov.Core()
    for name, hint in (("openvino-fp32", "f32"), ("openvino-default", None)):
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if hint:
            config["INFERENCE_PRECISION_HINT"] = hint
        compiled = core.compile_model(str(onnx_path), "CPU", config)
        precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        request = compiled.create_infer_request()
        rt = Runtime(name, fp32="float32" in precision or precision.endswith("f32"))
        rt.note = f"precision {precision}"
        rt.run = (lambda req: lambda: req.infer({0: x})[0])(request)
        rt.logits = (lambda req: lambda: np.array(req.infer({0: x})[0]))(request)
        runtimes.append(rt)
    return runtimes


SLUICE_VARIANTS = {
    "sluice": [],
    "sluice-cl": ["--layout", "channels-last"],
    "sluice-bf16": ["--layout", "onednn", "--precision", "bf16"],
}


def sluice_forward(binary: str, variant: str, folder: Path, input_json: Path, threads: int, iterations: int,
                   warmup: int) -> float:
    out = subprocess.run([binary, "bench", "forward", str(folder), "--input", str(input_json), "--iterations",
                          str(iterations), "--warmup", str(warmup), "--threads", str(threads),
                          *SLUICE_VARIANTS[variant]], capture_output=True, text=True, check=True, cwd=ROOT)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["median_ms"])


def sluice_logits(binary: str, variant: str, folder: Path, input_json: Path, threads: int) -> np.ndarray:
    out = subprocess.run([binary, "model", "predict", str(folder), "--input", str(input_json), "--threads",
                          str(threads), *SLUICE_VARIANTS[variant]], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    return np.array(json.loads(out.stdout)["logits"], dtype=np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=str(ROOT / "target/release/sluice"))
    ap.add_argument("--cases", default="resnet20:1,resnet20:32,resnet50:1,resnet50:8",
                    help="arch:batch pairs (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads everywhere (default: 2)")
    ap.add_argument("--budget-ms", type=float, default=1500,
                    help="time per runtime per round, which sets its iterations (default: 1500)")
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="FP32 logits' max |difference| from PyTorch, relative to the largest |logit|")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", help="folder for model folders, inputs and ONNX files (default: a temporary one)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    model_name, flags = cpu_description()
    bf16_cpu = any(f in flags for f in ("avx512_bf16", "amx_bf16"))
    print(f"CPU: {model_name}; {os.cpu_count()} logical CPUs; flags: {' '.join(flags) or 'none of interest'}")
    print(f"torch {torch.__version__}, threads {args.threads}, rounds {args.rounds}", flush=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sluice-reference-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"cpu": model_name, "flags": flags, "threads": args.threads, "rounds": args.rounds, "cases": []}
    failed = False
    for case in args.cases.split(","):
        arch, batch = case.split(":")
        batch = int(batch)
        spec = CASES[arch]
        folder = work / arch
        if not (folder / "model.safetensors").exists():
            dims = "x".join(map(str, spec["dims"]))
            subprocess.run([args.binary, "model", "init", str(folder), "--arch", arch, "--dims", dims, "--classes",
                            str(spec["classes"]), "--seed", str(args.seed)], check=True, cwd=ROOT,
                           stdout=subprocess.DEVNULL)
        rng = np.random.default_rng(args.seed)
        x = rng.standard_normal((batch, *spec["dims"]), dtype=np.float32)
        input_json = work / f"{arch}-b{batch}.json"
        input_json.write_text(json.dumps({"shape": list(x.shape), "data": x.ravel().tolist()}))
        model = load_torch_model(arch, folder)
        with torch.inference_mode():
            reference = model(torch.from_numpy(x)).numpy()
        scale = float(np.abs(reference).max())
        runtimes = make_runtimes(arch, folder, model, x, args.threads, work, args.binary, bf16_cpu)
        print(f"\n== {arch} batch {batch} {spec['dims']}: max |logit| {scale:.3g}")
        agreement = {}
        variants = [v for v in SLUICE_VARIANTS if bf16_cpu or v != "sluice-bf16"]
        for v in variants:
            got = sluice_logits(args.binary, v, folder, input_json, args.threads)
            agreement[v] = float(np.abs(got - reference).max())
        for rt in runtimes:
            agreement[rt.name] = float(np.abs(np.asarray(rt.logits(), dtype=np.float32) - reference).max())
        fp32 = {**{v: v != "sluice-bf16" for v in variants}, **{rt.name: rt.fp32 for rt in runtimes}}
        for name, d in agreement.items():
            ok = d <= args.tolerance * max(scale, 1.0)
            verdict = ("ok" if ok else "DISAGREES") if fp32[name] else "bf16, reported only"
            failed |= fp32[name] and not ok
            print(f"   logits vs PyTorch FP32: {name:17s} max |diff| {d:.3g}  ({verdict})")
        # Iterations per round from a quick probe of each runtime's speed.
        per_call = {rt.name: max(time_fn(rt.run, 3, 1), 0.01) for rt in runtimes}
        for v in variants:
            per_call[v] = per_call.get("eager-bf16" if v == "sluice-bf16" else "torchscript", 10.0)
        iters = {n: max(5, min(2000, int(args.budget_ms / ms))) for n, ms in per_call.items()}
        names = variants + [rt.name for rt in runtimes]
        by_name = {rt.name: rt for rt in runtimes}
        rounds: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                if n in SLUICE_VARIANTS:
                    ms = sluice_forward(args.binary, n, folder, input_json, args.threads, iters[n],
                                        max(3, iters[n] // 10))
                else:
                    ms = time_fn(by_name[n].run, iters[n], max(2, iters[n] // 10))
                rounds[n].append(ms)
            print(f"   round {r + 1}: " + ", ".join(f"{n} {rounds[n][-1]:.3f}" for n in names), flush=True)
        medians = {n: statistics.median(v) for n, v in rounds.items()}
        print(f"\n   {'runtime':17s} {'median ms':>10s} {'÷ sluice':>9s}  note")
        for n in names:
            note = by_name[n].note if n in by_name else " ".join(SLUICE_VARIANTS[n]) or "onednn fp32 (default)"
            print(f"   {n:17s} {medians[n]:10.3f} {medians[n] / medians['sluice']:9.2f}  {note}")
        fastest_fp32 = min((medians[n] for n in ("onnxruntime", "openvino-fp32") if n in medians and fp32[n]),
                           default=None)
        best_fp32 = min(medians[v] for v in variants if fp32[v])
        if fastest_fp32:
            print(f"   sluice FP32 (best layout) ÷ fastest of ONNX Runtime / OpenVINO FP32: "
                  f"{best_fp32 / fastest_fp32:.2f}")
        if "sluice-bf16" in medians and "openvino-default" in medians:
            print(f"   sluice bf16 ÷ OpenVINO default precision: "
                  f"{medians['sluice-bf16'] / medians['openvino-default']:.2f}")
        results["cases"].append({"arch": arch, "batch": batch, "dims": spec["dims"], "max_logit": scale,
                                 "agreement": agreement, "rounds": rounds, "median_ms": medians,
                                 "notes": {rt.name: rt.note for rt in runtimes}})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
