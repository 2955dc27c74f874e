"""The networks sluice serves, as PyTorch modules with sluice's (torchvision's) parameter
names, loaded from a sluice model folder's safetensors: what the reference benchmarks
(pytorch_reference.py) and the peer servers (peers/) run."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from safetensors.torch import load_file


def cifar_resnet(blocks: list[int], in_channels: int, classes: int) -> nn.Module:
    """A CIFAR-style ResNet with sluice's (torchvision's) parameter names: 3x3 stem, stages of
    16/32/64 channels of torchvision BasicBlocks, 1x1-conv+BN downsampling, no max-pool."""
    from torchvision.models.resnet import BasicBlock

    class CifarResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.relu = nn.ReLU(inplace=True)
            inplanes = 16
            for stage, (n, planes) in enumerate(zip(blocks, [16, 32, 64])):
                layers = []
                for i in range(n):
                    stride = 2 if stage > 0 and i == 0 else 1
                    down = None
                    if stride != 1 or inplanes != planes:
                        down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
                    layers.append(BasicBlock(inplanes, planes, stride, down))
                    inplanes = planes
                setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(64, classes)

        def forward(self, x):
            x = self.relu(self.bn1(self.conv1(x)))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return CifarResNet()


CASES = {
    "resnet20": dict(dims=(1, 28, 28), classes=10, build=lambda c, k: cifar_resnet([3, 3, 3], c, k)),
    "resnet50": dict(dims=(3, 224, 224), classes=1000,
                     build=lambda c, k: torchvision.models.resnet50(num_classes=k)),
}


def load_torch_model(arch: str, folder: Path) -> nn.Module:
    spec = CASES[arch]
    model = spec["build"](spec["dims"][0], spec["classes"])
    state = load_file(str(folder / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.startswith(("gates.", "slim."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise SystemExit(f"{arch}: the safetensors do not match the PyTorch model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval()
