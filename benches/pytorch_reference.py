"""PyTorch 2.11 reference timings for the models in benches/engine.rs, to run in the same
sitting as `cargo bench --bench engine` (compare ratios, not absolute times).

    <venv with torch==2.11.0 torchvision==0.26.0>/bin/python benches/pytorch_reference.py

Prints median ms per variant: eager NCHW / channels-last under inference_mode, and frozen
TorchScript (trace + freeze, which folds batch-norm) in both layouts.
"""
import argparse
import statistics
import time

import torch
import torchvision

import sys, os
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
from generate import CifarResNet  # noqa: E402


def timeit(fn, runs, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--only", default="", help="only cases whose name starts with this, e.g. resnet50")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cases = [
        ("resnet50", lambda: torchvision.models.resnet50(weights=None), 1, 3, 224),
        ("resnet20", lambda: CifarResNet(20, 1, 10), 1, 1, 28),
        ("resnet20", lambda: CifarResNet(20, 1, 10), 32, 1, 28),
    ]
    for name, make, batch, ch, hw in cases:
        if not name.startswith(a.only):
            continue
        x = torch.randn(batch, ch, hw, hw)
        xcl = x.contiguous(memory_format=torch.channels_last)
        nchw = make().eval()
        cl = make().eval().to(memory_format=torch.channels_last)
        cl.load_state_dict(nchw.state_dict())
        with torch.no_grad():
            jit = torch.jit.freeze(torch.jit.trace(nchw, x))
            jit_cl = torch.jit.freeze(torch.jit.trace(cl, xcl))
        fns = {
            "eager_nchw": (nchw, x),
            "eager_cl": (cl, xcl),
            "frozen_jit_nchw": (jit, x),
            "frozen_jit_cl": (jit_cl, xcl),
        }
        res = {}
        for label, (m, inp) in fns.items():
            def f(m=m, inp=inp):
                with torch.inference_mode():
                    m(inp)
            res[label] = timeit(f, a.runs)
        print(f"{name} b{batch}x{hw}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
