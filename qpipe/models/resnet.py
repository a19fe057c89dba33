"""ResNets: torchvision-compatible ResNet18, CIFAR ResNet20 (He et al. 2016) and the small digits ResNet.

State-dict keys follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``),
so a torchvision ``resnet18`` checkpoint loads with ``--weights``. No torchvision import.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A BasicBlock ResNet. ``stem='imagenet'``: 7x7/2 conv + 3x3/2 max-pool; ``'cifar'``: one 3x3 conv."""

    def __init__(self, blocks: list[int], widths: list[int], num_classes: int, in_channels: int = 3,
                 stem: str = "imagenet"):
        super().__init__()
        w0 = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, w0, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_channels, w0, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU(inplace=False)
        cin = w0
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            stride = 1 if i == 0 else 2
            layers = [BasicBlock(cin, w, stride)] + [BasicBlock(w, w) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            cin = w
        self.n_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes)


def resnet20(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet20 (3 stages x 3 blocks, widths 16/32/64; 1x1-conv shortcuts where the shape changes)."""
    return ResNet([3, 3, 3], [16, 32, 64], num_classes, stem="cifar")


def digits_cnn(num_classes: int = 10) -> ResNet:
    """Small ResNet for 1x8x8 digits: widths 16/24/32, one block per stage, ~31k parameters."""
    return ResNet([1, 1, 1], [16, 24, 32], num_classes, in_channels=1, stem="cifar")
