"""TorchServe handler for `make bench-peers`: a sluice model folder's dense network in
PyTorch, answering Open Inference Protocol (v2) JSON bodies on TorchServe's own
`/predictions/<model>` endpoint, one response per request of a TorchServe batch.

The archive carries model.safetensors, torchmodels.py and peer.json (`arch`, `threads`,
`channels_last`); TorchServe's kservev2 envelope is not used because it only reads the first
request of a batch."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch


class DenseHandler:
    def __init__(self):
        self.net = None
        self.channels_last = False
        self.name = "model"

    def initialize(self, context):
        model_dir = context.system_properties["model_dir"]
        config = json.loads(Path(model_dir, "peer.json").read_text())
        torch.set_num_threads(int(config["threads"]))
        sys.path.insert(0, model_dir)
        from torchmodels import load_torch_model

        net = load_torch_model(config["arch"], Path(model_dir))
        self.channels_last = bool(config.get("channels_last"))
        self.net = net.to(memory_format=torch.channels_last) if self.channels_last else net
        self.name = context.manifest["model"]["modelName"]

    def handle(self, data, context):
        arrays = []
        for row in data:
            body = row.get("body") or row.get("data")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            tensor = body["inputs"][0]
            arrays.append(np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"]))
        x = torch.from_numpy(np.concatenate(arrays))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            logits = self.net(x).numpy()
        out, start = [], 0
        for a in arrays:
            rows = logits[start:start + a.shape[0]]
            start += a.shape[0]
            out.append({"model_name": self.name, "outputs": [
                {"name": "logits", "datatype": "FP32", "shape": list(rows.shape), "data": rows.ravel().tolist()}]})
        return out


_service = DenseHandler()


def handle(data, context):
    if _service.net is None:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)


os.environ.setdefault("OMP_NUM_THREADS", "2")
