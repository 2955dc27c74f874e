"""Trains a dense ResNet in PyTorch on an image folder (torchvision's
ImageFolder: train/ and val/ [and test/]) and exports its state_dict as safetensors with the
names sluice reads — the "network trained elsewhere" of the bring-your-own-model proof
(benches/byom/run.sh). Standard recipe: SGD with momentum 0.9, weight decay 5e-4, cosine
learning rate from 0.1, random crop (padding 4) and horizontal flip, per-channel
normalisation measured on the training images. Needs torch, torchvision, safetensors.

    python benches/byom/train_teacher.py DATA OUT.safetensors [--epochs 15] [--threads 2]
        [--arch resnet20|resnet50] [--limit N]

--arch resnet50 is torchvision's ResNet-50 (Bottleneck blocks, its ImageNet stem) at the
folder's image size; --limit trains on N training images spread evenly over the folder.

Prints the statistics it normalised with (pass them to `sluice model import`) and the
validation and test accuracy; writes OUT.json with them.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torchvision
import torchvision.transforms as T
from safetensors.torch import save_file


# The same CIFAR-style ResNet (torchvision's parameter names, 1x1 projection shortcuts) as
# sluice's numerical fixtures.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures"))
from generate import CifarResNet  # noqa: E402


def channel_stats(folder):
    """Per-channel mean and std of the training images scaled to [0, 1]."""
    loader = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(folder, T.ToTensor()), batch_size=1000)
    total, s, sq = 0, torch.zeros(3), torch.zeros(3)
    for x, _ in loader:
        total += x.numel() // 3
        s += x.sum(dim=(0, 2, 3))
        sq += (x * x).sum(dim=(0, 2, 3))
    mean = s / total
    return mean.tolist(), (sq / total - mean * mean).sqrt().tolist()


def accuracy(model, loader):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return correct / total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", choices=["resnet20", "resnet50"], default="resnet20")
    ap.add_argument("--limit", type=int, default=0, help="train on N images, every len/N-th (0: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    mean, std = channel_stats(os.path.join(args.data, "train"))
    mean, std = [round(m, 4) for m in mean], [round(s, 4) for s in std]
    norm = T.Normalize(mean, std)
    train_set = torchvision.datasets.ImageFolder(
        os.path.join(args.data, "train"), T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm]))
    plain = T.Compose([T.ToTensor(), norm])
    val_set = torchvision.datasets.ImageFolder(os.path.join(args.data, "val"), plain)
    test_dir = os.path.join(args.data, "test")
    test_set = torchvision.datasets.ImageFolder(test_dir, plain) if os.path.isdir(test_dir) else val_set
    if args.limit and args.limit < len(train_set):
        # Evenly spaced over the class-sorted folder, so every class keeps its share.
        n = len(train_set)
        train_set = torch.utils.data.Subset(train_set, [i * n // args.limit for i in range(args.limit)])
    train = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=1,
                                        persistent_workers=True)
    val = torch.utils.data.DataLoader(val_set, batch_size=500)
    test = torch.utils.data.DataLoader(test_set, batch_size=500)
    classes = val_set.classes
    if args.arch == "resnet50":
        model = torchvision.models.resnet50(num_classes=len(classes))
    else:
        model = CifarResNet(20, 3, len(classes))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, epochs=args.epochs, steps_per_epoch=len(train),
                                                pct_start=0.15, anneal_strategy="cos")
    started = time.time()
    for epoch in range(args.epochs):
        model.train()
        for x, y in train:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{args.epochs}: validation accuracy {accuracy(model, val):.4f} "
              f"({time.time() - started:.0f} s)", flush=True)
    result = {"mean": mean, "std": std, "classes": classes, "arch": args.arch,
              "train_images": len(train_set), "epochs": args.epochs,
              "seconds": round(time.time() - started, 1), "validation_accuracy": accuracy(model, val),
              "test_accuracy": accuracy(model, test)}
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
