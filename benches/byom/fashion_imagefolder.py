"""Writes Fashion-MNIST as an image folder of 32x32 RGB PNGs (torchvision's ImageFolder
convention) for the bring-your-own-model proof (benches/byom/run.sh): `train/<class>/`,
`val/<class>/` (the last 5000 training images, as sluice's own split) and `test/<class>/`.
Each 28x28 grayscale image is padded by 2 pixels to 32x32 and repeated in R, G and B, so the
folder is a dataset sluice never saw in this form. Needs numpy and Pillow.

    python benches/byom/fashion_imagefolder.py OUT [--idx /usr/share/datasets/fashion-mnist] [--limit N]
"""
import argparse
import gzip
import os

import numpy as np
from PIL import Image

CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle_boot"]


def read_idx(path, magic):
    with gzip.open(path, "rb") as f:
        data = f.read()
    assert int.from_bytes(data[:4], "big") == magic, path
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write(out, split, images, labels):
    for c in CLASSES:
        os.makedirs(os.path.join(out, split, c), exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        padded = np.pad(img, 2)
        rgb = np.repeat(padded[:, :, None], 3, axis=2)
        Image.fromarray(rgb, "RGB").save(os.path.join(out, split, CLASSES[label], f"{i:05d}.png"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--idx", default=os.environ.get("SLUICE_DATA_DIR", "/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--limit", type=int, default=0, help="at most N images per split (0: all)")
    args = ap.parse_args()
    train = read_idx(os.path.join(args.idx, "train-images-idx3-ubyte.gz"), 0x803)
    train_labels = read_idx(os.path.join(args.idx, "train-labels-idx1-ubyte.gz"), 0x801)
    test = read_idx(os.path.join(args.idx, "t10k-images-idx3-ubyte.gz"), 0x803)
    test_labels = read_idx(os.path.join(args.idx, "t10k-labels-idx1-ubyte.gz"), 0x801)
    cut = len(train) - 5000
    parts = {"train": (train[:cut], train_labels[:cut]), "val": (train[cut:], train_labels[cut:]),
             "test": (test, test_labels)}
    for split, (images, labels) in parts.items():
        if args.limit:
            images, labels = images[:args.limit], labels[:args.limit]
        write(args.out, split, images, labels)
        print(f"{split}: {len(images)} images")


if __name__ == "__main__":
    main()
