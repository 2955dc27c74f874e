#!/usr/bin/env python3
"""What a convolution costs in libtorch as its channel counts shrink, per ResNet-50 shape.

`select` mode runs its gathered convolutions through libtorch's `conv2d` on channels-last
activations (docs/benchmarks.md, "select at batch 8 and 75% FLOPs"). This probe times the
dense shapes of ResNet-50's first stage (56x56) against the same shapes with the inner
channels cut to 5/8 and 3/4, at batch 1 and 8, so one can see how much of the FLOP saving a
kept channel fraction turns into time: at batch 8 the 1x1 convolutions that read or write
256 channels are bound by memory traffic, not arithmetic, so their time falls far less than
their FLOPs.

Not in CI. Run with the bench venv (any torch works):
    .cache/bench-venv/bin/python benches/conv_shapes.py [--threads 2] [--runs 20]
"""

import argparse
import sys

import torch

sys.dont_write_bytecode = True  # no benches/__pycache__ from the import below
from pytorch_reference import time_fn  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # (in, out, kernel): ResNet-50's first-stage bottleneck at full inner width (64), then at
    # 48 and 40 inner channels (3/4 and 5/8).
    shapes = []
    for inner in (64, 48, 40):
        shapes += [(256, inner, 1), (inner, inner, 3), (inner, 256, 1)]
    side = 56
    print(f"torch {torch.__version__}, {args.threads} threads, {side}x{side}, channels-last, FP32")
    print("| batch | in | out | kernel | GFLOP | ms | GFLOP/s | time vs the 64-wide shape | FLOPs vs it |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch in (int(b) for b in args.batches.split(",")):
        dense = {}
        for cin, cout, k in shapes:
            x = torch.randn(batch, cin, side, side).to(memory_format=torch.channels_last)
            w = torch.randn(cout, cin, k, k)
            b = torch.randn(cout)
            gflop = batch * side * side * cin * cout * k * k * 2 / 1e9
            with torch.no_grad():
                ms = time_fn(lambda: torch.conv2d(x, w, b, 1, k // 2), args.runs, warmup=3)
            role = (k, cin == 256, cout == 256)
            dense.setdefault(role, (ms, gflop))
            ref_ms, ref_gflop = dense[role]
            print(
                f"| {batch} | {cin} | {cout} | {k}x{k} | {gflop:.3f} | {ms:.2f} | {gflop / ms * 1e3:.0f} "
                f"| {ms / ref_ms:.2f} | {gflop / ref_gflop:.2f} |"
            )


if __name__ == "__main__":
    main()
