#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/ (README.md).

Run with the project's test environment (Pillow, tritonclient), from anywhere:
    .venv/bin/python fuzz/scripts/make_corpus.py
Seeds are small valid (and a few nearly valid) inputs; `cargo fuzz cmin` trims them later.
"""
import io
import json
import pathlib
import struct

from PIL import Image
from tritonclient.grpc import service_pb2 as pb

FUZZ = pathlib.Path(__file__).resolve().parent.parent
ROOT = FUZZ.parent
CORPUS = FUZZ / "corpus"
ITEM = 784


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


# ---------------------------------------------------------------- images
def encode(img, fmt, **kw):
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def gradient(mode, w, h):
    img = Image.new("L", (w, h))
    img.putdata([(x * 9 + y * 5) % 256 for y in range(h) for x in range(w)])
    return img.convert(mode)


IMAGES = {
    "ankle-boot.png": (ROOT / "deploy/examples/ankle-boot.png").read_bytes(),
    "pullover.png": (ROOT / "deploy/examples/pullover.png").read_bytes(),
    "gray28.png": encode(gradient("L", 28, 28), "PNG"),
    "rgb40x30.png": encode(gradient("RGB", 40, 30), "PNG"),
    "rgba12.png": encode(gradient("RGBA", 12, 12), "PNG"),
    "la9.png": encode(gradient("LA", 9, 9), "PNG"),
    "palette16.png": encode(gradient("RGB", 16, 16).convert("P", palette=Image.ADAPTIVE, colors=8), "PNG"),
    "bilevel20.png": encode(gradient("L", 20, 20).convert("1"), "PNG"),
    "gray16bit.png": encode(gradient("L", 10, 7).convert("I;16"), "PNG"),
    "one-pixel.png": encode(Image.new("L", (1, 1), 200), "PNG"),
    "gray28.jpg": encode(gradient("L", 28, 28), "JPEG", quality=75),
    "rgb32.jpg": encode(gradient("RGB", 32, 32), "JPEG", quality=50),
    "rgb30x20-progressive.jpg": encode(gradient("RGB", 30, 20), "JPEG", quality=60, progressive=True),
    "rgb17-subsampled.jpg": encode(gradient("RGB", 17, 13), "JPEG", quality=40, subsampling=2),
    "cmyk16.jpg": encode(gradient("RGB", 16, 16).convert("CMYK"), "JPEG", quality=70),
}


# ---------------------------------------------------------------- image_decode: [channels byte, image]
for name, data in IMAGES.items():
    write("image_decode", f"gray-{name}", b"\x00" + data)
for name in ("ankle-boot.png", "rgb40x30.png", "rgb32.jpg", "cmyk16.jpg"):
    write("image_decode", f"rgb-{name}", b"\x01" + IMAGES[name])


# ---------------------------------------------------------------- binary_split: [max, raw]
def prefixed(*elements):
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


write("binary_split", "two", b"\x02" + prefixed(b"hi", b""))
write("binary_split", "images", b"\x20" + prefixed(IMAGES["ankle-boot.png"], IMAGES["gray28.jpg"]))
write("binary_split", "over-max", b"\x01" + prefixed(b"a", b"b", b"c"))
write("binary_split", "truncated", b"\x04" + prefixed(b"abcdef")[:7])
write("binary_split", "empty", b"\x00")


# ---------------------------------------------------------------- http_json: [b0, b1, body]
def http(model, mode, n=0):
    """model: 0 tensor, 1 image; mode: 0 all JSON, 1 raw body, 2 JSON part of length n."""
    assert n < 8192
    return bytes([model | mode << 1 | (n >> 8) << 3, n & 0xFF])


def j(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


def fp32_input(batch=1, data=None, **extra):
    t = {"name": "input", "datatype": "FP32", "shape": [batch, 1, 28, 28]}
    if data is not None:
        t["data"] = data
    t.update(extra)
    return t


zeros = [0.0] * ITEM
write("http_json", "request.json", http(0, 0) + (ROOT / "deploy/examples/request.json").read_bytes())
write("http_json", "flat", http(0, 0) + j({"inputs": [fp32_input(data=[0.5] * ITEM)]}))
nested = [[[[0.25] * 28 for _ in range(28)]]]
write("http_json", "nested", http(0, 0) + j({"id": "n1", "inputs": [fp32_input(data=nested)]}))
write(
    "http_json",
    "params-outputs",
    http(0, 0)
    + j(
        {
            "id": "req-7",
            "parameters": {"sluice_budget": 0.5, "timeout": 250000, "sluice_channel_mode": "slice"},
            "inputs": [fp32_input(2, [0.1] * (2 * ITEM))],
            "outputs": [
                {"name": "logits", "parameters": {"classification": 3, "binary_data": False}},
                {"name": "sluice_flops"},
                {"name": "sluice_exit", "parameters": {"binary_data": True}},
            ],
        }
    ),
)
write(
    "http_json",
    "thresholds",
    http(0, 0)
    + j(
        {
            "parameters": {
                "sluice_channel_threshold": 0.3,
                "sluice_block_threshold": 0.2,
                "sluice_exit_threshold": 0.9,
                "sluice_channel_mode": "select",
                "binary_data_output": True,
            },
            "inputs": [fp32_input(data=zeros)],
        }
    ),
)
header = j(
    {
        "inputs": [fp32_input(parameters={"binary_data_size": 4 * ITEM})],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True, "classification": 2}}],
    }
)
write("http_json", "binary-fp32", http(0, 2, len(header)) + header + struct.pack(f"<{ITEM}f", *([0.75] * ITEM)))
write("http_json", "raw-fp32", http(0, 1) + struct.pack(f"<{ITEM}f", *([-0.5] * ITEM)))
# Image model: raw body (one image), binary extension (length-prefixed), JSON strings.
write("http_json", "raw-image", http(1, 1) + IMAGES["ankle-boot.png"])
images = prefixed(IMAGES["ankle-boot.png"], IMAGES["gray28.jpg"])
header = j(
    {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2, 1], "parameters": {"binary_data_size": len(images)}}],
        "parameters": {"binary_data_output": True},
    }
)
write("http_json", "binary-images", http(1, 2, len(header)) + header + images)
write(
    "http_json",
    "bytes-strings",
    http(1, 0)
    + j({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2, 1], "data": ["not a png", "\u00e9\u0000"]}]}),
)
write(
    "http_json",
    "bytes-nested",
    http(1, 0) + j({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1], "data": [["x"]]}]}),
)


# ---------------------------------------------------------------- grpc_convert: ModelInferRequest
def param(v):
    p = pb.InferParameter()
    if isinstance(v, bool):
        p.bool_param = v
    elif isinstance(v, int):
        p.int64_param = v
    elif isinstance(v, float):
        p.double_param = v
    else:
        p.string_param = v
    return p


def grpc(name, model, inputs, raw=(), params=None, outputs=(), id=""):
    r = pb.ModelInferRequest(model_name=model, id=id)
    for k, v in (params or {}).items():
        r.parameters[k].CopyFrom(param(v))
    for i in inputs:
        t = r.inputs.add(name=i["name"], datatype=i["datatype"], shape=i["shape"])
        if "fp32" in i:
            t.contents.fp32_contents.extend(i["fp32"])
        if "bytes" in i:
            t.contents.bytes_contents.extend(i["bytes"])
    for o, ps in outputs:
        out = r.outputs.add(name=o)
        for k, v in ps.items():
            out.parameters[k].CopyFrom(param(v))
    r.raw_input_contents.extend(raw)
    write("grpc_convert", name, r.SerializeToString())


T, I = "fashion-resnet20", "fashion-resnet20-image"
tensor = {"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28]}
grpc("raw-fp32", T, [tensor], raw=[struct.pack(f"<{ITEM}f", *([0.5] * ITEM))])
grpc("typed-fp32", T, [dict(tensor, shape=[2, 1, 28, 28], fp32=[0.25] * (2 * ITEM))], id="t2")
grpc(
    "params-classification",
    T,
    [dict(tensor, fp32=zeros)],
    params={"sluice_budget": 0.4, "timeout": 1000, "sluice_channel_mode": "select"},
    outputs=[("logits", {"classification": 3}), ("sluice_flops", {}), ("sluice_exit", {})],
)
grpc(
    "thresholds",
    T,
    [dict(tensor, fp32=zeros)],
    params={"sluice_channel_threshold": 0.5, "sluice_block_threshold": 0.1, "sluice_exit_threshold": 0.8},
)
image = {"name": "image", "datatype": "BYTES", "shape": [1, 1]}
grpc("raw-image", I, [image], raw=[prefixed(IMAGES["ankle-boot.png"])])
grpc("typed-images", I, [dict(image, shape=[2, 1], bytes=[IMAGES["pullover.png"], IMAGES["gray28.jpg"]])])
grpc("rgb-jpeg", I, [dict(image, bytes=[IMAGES["rgb32.jpg"]])], outputs=[("logits", {"classification": 10})])
