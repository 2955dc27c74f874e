#!/usr/bin/env python3
"""KServe's Python model server (kserve.ModelServer) serving a sluice model folder's dense
network in PyTorch, over the Open Inference Protocol (v2) on HTTP: the peer `make
bench-peers` drives with the same requests as sluice.

    .cache/peers-venv/bin/python benches/peers/kserve_server.py --model-dir DIR --arch resnet20 \
        --name fashion-resnet20 --http-port 8080 [--threads 2]

One input (FP32 `[N, C, H, W]`), one output `logits` (FP32 `[N, classes]`), eval mode,
`torch.inference_mode`, the given number of intra-op threads, channels-last when it is the
faster layout for the network (decided by the caller with --channels-last)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import kserve
import numpy as np
import torch
from kserve import InferOutput, InferRequest, InferResponse

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from torchmodels import load_torch_model  # noqa: E402


class DenseModel(kserve.Model):
    def __init__(self, name: str, model_dir: Path, arch: str, channels_last: bool):
        super().__init__(name)
        self.model_dir, self.arch, self.channels_last = model_dir, arch, channels_last
        self.net = None
        self.load()

    def load(self) -> bool:
        net = load_torch_model(self.arch, self.model_dir)
        self.net = net.to(memory_format=torch.channels_last) if self.channels_last else net
        self.ready = True
        return True

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        x = torch.from_numpy(np.ascontiguousarray(payload.inputs[0].as_numpy(), dtype=np.float32))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            logits = self.net(x).numpy()
        out = InferOutput(name="logits", shape=list(logits.shape), datatype="FP32")
        out.set_data_from_numpy(logits, binary_data=False)
        return InferResponse(model_name=self.name, infer_outputs=[out], response_id=payload.id or "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--arch", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--http-port", type=int, default=8080)
    ap.add_argument("--grpc-port", type=int, default=8081)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    model = DenseModel(args.name, args.model_dir, args.arch, args.channels_last)
    kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=1,
                       enable_grpc=False).start([model])


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
