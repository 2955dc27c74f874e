"""Writes an ImageNet-like image folder for the loader benchmark (benches/byom/loader.sh):
JPEGs of ImageNet's typical 500x375, quality 90, in `train/<class>/` and `val/<class>/`, made
from Fashion-MNIST images (upscaled, tinted per image, with noise, so each file decodes like a
photograph rather than a flat drawing). What it measures is the cost of reading, decoding and
resizing such files, not accuracy. Needs numpy and Pillow.

    python benches/byom/imagenet_like.py OUT [--train 640] [--val 100] [--idx /usr/share/datasets/fashion-mnist]
"""
import argparse
import os

import numpy as np
from PIL import Image

from fashion_imagefolder import CLASSES, read_idx


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=640)
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--idx", default="/usr/share/datasets/fashion-mnist")
    args = ap.parse_args()
    images = read_idx(os.path.join(args.idx, "train-images-idx3-ubyte.gz"), 0x0803)
    labels = read_idx(os.path.join(args.idx, "train-labels-idx1-ubyte.gz"), 0x0801)
    rng = np.random.default_rng(0)
    start = 0
    for split, count in [("train", args.train), ("val", args.val)]:
        for c in CLASSES:
            os.makedirs(os.path.join(args.out, split, c), exist_ok=True)
        for i in range(start, start + count):
            big = np.asarray(Image.fromarray(images[i]).resize((500, 375), Image.BICUBIC), np.float32)
            tint = rng.uniform(0.4, 1.0, 3)
            noise = rng.normal(0, 12, (375, 500, 3))
            rgb = np.clip(big[:, :, None] * tint + noise + rng.uniform(0, 60, 3), 0, 255).astype(np.uint8)
            path = os.path.join(args.out, split, CLASSES[labels[i]], f"{i:05d}.jpg")
            Image.fromarray(rgb, "RGB").save(path, quality=90)
        start += count


if __name__ == "__main__":
    main()
