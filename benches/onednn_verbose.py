#!/usr/bin/env python3
"""Per-primitive medians from a oneDNN verbose log: which kernel ran each shape, how long.

sluice's `onednn` layout runs on oneDNN primitives it owns (src/engine/onednn.cpp), and
`ONEDNN_VERBOSE=1` makes the library print one `exec` line per primitive call with its
implementation, problem shape and time in ms. This groups those lines by (primitive,
implementation, shape) and prints the call count, the median time and, for convolutions,
the arithmetic rate (2 x multiply-accumulates per ms). Load-time timing runs both kernels of
a shape (direct and Winograd, direct and subsample), so one log of `sluice bench engine`
holds both for every prepared shape: the rows to compare sit next to each other.

Not in CI; standard library only. For example (docs/benchmarks.md, stop 27):
    ONEDNN_VERBOSE=1 target/release/sluice bench engine --models resnet50 --batches 1,8 \\
        --gates channel-slice --targets 0.75,0.5 --rounds 4 > /tmp/verbose.log
    python3 benches/onednn_verbose.py /tmp/verbose.log --match 'ih56oh56kh3'

With `--forwards N` it instead splits the log into whole forwards, each starting at the
stem's convolution (`--stem`), and for the last N of them sums the time per convolution
class (kernel and stride, input size) and of the reorders; the forwards with the most
FLOPs are the dense engine's, the rest the gated one's (`sluice bench engine` alternates
them), and each class prints the median over its forwards (docs/benchmarks.md, stop 33):
    ONEDNN_VERBOSE=1 target/release/sluice bench engine --models resnet50 --batches 1 \\
        --gates channel-slice --targets 0.5 --rounds 16 > /tmp/verbose.log
    python3 benches/onednn_verbose.py /tmp/verbose.log --forwards 40
"""

import argparse
import re
import signal
import statistics
import sys
from collections import defaultdict

# `src_f32::blocked:acdb:f0` -> (src, blocked, acdb); packed weights carry a `p` flag
# (`dst_f32:p:blocked:Acdb48a:f0`), Winograd's have no tag (`dst_f32::wino::f0`).
LAYOUT = re.compile(r"(src|dst)_\w+?:\w*:(\w+):(\w*):")
CONV = re.compile(r"mb(\d+)_ic(\d+)oc(\d+)_ih(\d+)oh(\d+)kh(\d+)sh\d+dh\d+ph\d+_iw\d+ow(\d+)kw(\d+)")


def conv_flops(shape: str) -> int:
    """2 x MACs of a convolution problem string (groups of 1), 0 if it is not one."""
    m = CONV.search(shape)
    if not m:
        return 0
    mb, ic, oc, _ih, oh, kh, ow, kw = map(int, m.groups())
    return 2 * mb * ic * oc * oh * ow * kh * kw


def executions(path):
    """`(fields, ms)` of every `exec` line of a verbose log (`path`, or stdin when None):
    onednn_verbose,exec,cpu,<primitive>,<implementation>,...,<shape>,<ms>"""
    with open(path) if path else sys.stdin as lines:
        for line in lines:
            fields = line.rstrip("\n").split(",")
            if len(fields) < 6 or fields[1] != "exec":
                continue
            try:
                yield fields, float(fields[-1])
            except ValueError:
                continue


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("log", nargs="?", help="verbose log (default: stdin)")
    parser.add_argument("--match", default="", help="only shapes matching this regular expression")
    parser.add_argument("--skip", type=int, default=0,
                        help="ignore the first N exec lines (load-time packing, warm-up)")
    parser.add_argument("--forwards", type=int, default=0,
                        help="sum per convolution class over each of the last N whole forwards")
    parser.add_argument("--stem", default=r"ic3oc64_ih224",
                        help="the shape that starts a forward (default: ResNet-50's stem at 224)")
    args = parser.parse_args()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends it quietly
    if args.forwards > 0:
        return forwards(args)
    pattern = re.compile(args.match)

    calls = defaultdict(list)
    for seen, (fields, ms) in enumerate(executions(args.log), start=1):
        shape = fields[-2]
        if seen <= args.skip or not pattern.search(shape):
            continue
        if fields[3] == "reorder":
            # A reorder's shape is only its dims: tell them apart by their layouts
            # (`acdb` is channels-last; blocked ones are Winograd's activations).
            layouts = {arg: tag or kind for arg, kind, tag in LAYOUT.findall(fields[6])}
            shape = f"{shape} {layouts.get('src', '?')}->{layouts.get('dst', '?')}"
        calls[(fields[3], fields[4].split(":")[0], shape)].append(ms)

    print(f"{'calls':>6}  {'primitive':<12} {'implementation':<20} {'median ms':>10} {'GFLOP/s':>8}  shape")
    for (primitive, impl, shape), times in sorted(calls.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        median = statistics.median(times)
        flops = conv_flops(shape) if primitive == "convolution" else 0
        rate = f"{flops / median / 1e6:8.1f}" if flops and median > 0 else " " * 8
        print(f"{len(times):6d}  {primitive:<12} {impl:<20} {median:10.3f} {rate}  {shape}")
    if not calls:
        print("no exec lines matched (run with ONEDNN_VERBOSE=1?)", file=sys.stderr)
        return 1
    return 0


def conv_class(shape: str) -> str:
    """`1x1 s2 ih56`: kernel, stride and input size of a convolution problem string."""
    m = CONV.search(shape)
    stride = re.search(r"sh(\d+)", shape)
    if not m:
        return "convolution ?"
    _mb, _ic, _oc, ih, _oh, kh, _ow, kw = m.groups()
    return f"conv {kh}x{kw} s{stride.group(1) if stride else '?'} ih{ih}"


def forwards(args) -> int:
    stem = re.compile(args.stem)
    runs = []
    for fields, ms in executions(args.log):
        if fields[3] == "convolution" and stem.search(fields[-2]):
            runs.append(defaultdict(float))
        if not runs:
            continue
        run = runs[-1]
        if fields[3] == "convolution":
            run[conv_class(fields[-2])] += ms
            run["convolutions"] += ms
            run["GFLOPs"] += conv_flops(fields[-2]) / 1e9
        else:
            run[fields[3]] += ms
    runs = runs[-args.forwards:]
    if not runs:
        print("no forward found (run with ONEDNN_VERBOSE=1? a different --stem?)", file=sys.stderr)
        return 1
    most = max(run["GFLOPs"] for run in runs)
    groups = {"dense": [r for r in runs if r["GFLOPs"] >= 0.95 * most],
              "gated": [r for r in runs if r["GFLOPs"] < 0.95 * most]}
    keys = sorted({k for run in runs for k in run})
    print(f"{'':<22}" + "".join(f"{name + ' (' + str(len(g)) + ')':>14}" for name, g in groups.items()))
    for key in keys:
        cells = []
        for group in groups.values():
            # Blank where no forward of the group ran that class; 0 counts where some did not.
            present = any(key in r for r in group)
            values = [r.get(key, 0.0) for r in group]
            cells.append(f"{statistics.median(values):14.3f}" if present else " " * 14)
        print(f"{key:<22}" + "".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
