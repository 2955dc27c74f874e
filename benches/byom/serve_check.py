"""The last step of the bring-your-own-model proof (benches/byom/run.sh): the retrofitted
folder served by `sluice serve`, asked over HTTP (the Open Inference Protocol's JSON) to
classify test images of the folder, dense and at a budget. Prints per budget how many it
got right and the executed FLOPs per image; fails if an answer's logits are not one row
of one score per class or if the budget does not lower the FLOPs.

    python benches/byom/serve_check.py URL MODEL TEST_DIR TEACHER_JSON [--per-class 5] [--budget 0.5]

TEST_DIR is the image folder's test/ (one sub-folder per class, the classes in the order
TEACHER_JSON lists them); FP32 inputs are normalised here with the teacher's statistics, as
the model's config records them. Needs numpy and Pillow (the bench venv has both).
"""
import argparse
import json
import os
import sys
import urllib.request

import numpy as np
from PIL import Image


def infer(url, model, x, parameters):
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                        "data": x.ravel().tolist()}], "parameters": parameters}
    request = urllib.request.Request(f"{url}/v2/models/{model}/infer", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=60) as reply:
        return json.load(reply)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("model")
    ap.add_argument("test_dir")
    ap.add_argument("teacher_json")
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.5)
    args = ap.parse_args()
    teacher = json.load(open(args.teacher_json))
    mean = np.array(teacher["mean"], np.float32).reshape(3, 1, 1)
    std = np.array(teacher["std"], np.float32).reshape(3, 1, 1)
    images, labels = [], []
    for label, name in enumerate(teacher["classes"]):
        files = sorted(os.listdir(os.path.join(args.test_dir, name)))[: args.per_class]
        for f in files:
            pixels = np.asarray(Image.open(os.path.join(args.test_dir, name, f)).convert("RGB"), np.float32)
            images.append((pixels.transpose(2, 0, 1) / 255.0 - mean) / std)
            labels.append(label)
    failures = []
    flops = {}
    for title, parameters in [("dense", {}), (f"budget {args.budget}", {"sluice_budget": args.budget})]:
        correct, executed = 0, 0
        for x, label in zip(images, labels):
            reply = infer(args.url, args.model, x[None], parameters)
            logits = next(o for o in reply["outputs"] if o["name"] != "sluice_flops")
            if logits["shape"] != [1, len(teacher["classes"])]:
                failures.append(f"{title}: logits of shape {logits['shape']}")
                continue
            correct += int(np.argmax(logits["data"]) == label)
            executed += reply["parameters"]["sluice_flops_executed"]
        flops[title] = executed / len(images)
        print(f"{title}: {correct}/{len(images)} correct, {flops[title] / 1e6:.1f} MFLOPs per image executed")
    if not flops[f"budget {args.budget}"] < flops["dense"]:
        failures.append("the budget did not lower the executed FLOPs")
    if failures:
        print("FAILED: " + "; ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
