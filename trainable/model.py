"""ResNet18 for 32x32 images: the standard CIFAR variant and the original assignment's."""

from __future__ import annotations

import torch
from torch import nn

from trainable.constants import MODEL_NAMES, RESNET18, RESNET18_ERA


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the input (1x1 conv+BN where the shape changes), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


def _stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_channels, out_channels, stride),
                         BasicBlock(out_channels, out_channels, 1))


class ResNet18(nn.Module):
    """Standard CIFAR ResNet18: 3x3 stride-1 stem, stages at 32/16/8/4 pixels, linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True))
        self.layer1 = _stage(64, 64, 1)
        self.layer2 = _stage(64, 128, 2)
        self.layer3 = _stage(128, 256, 2)
        self.layer4 = _stage(256, 512, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.head(torch.flatten(self.pool(x), 1))


class ResNet18Era(nn.Module):
    """The original assignment's model, as its summary table shows: a stride-2 stem with
    ReLU before BatchNorm and a max-pool down to 8x8, all eight blocks at 8x8, a 1x1 conv head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 2, 3, bias=False), nn.ReLU(inplace=True),
                                  nn.BatchNorm2d(64), nn.MaxPool2d(3, 2))
        self.layer1 = _stage(64, 64, 1)
        self.layer2 = _stage(64, 128, 1)
        self.layer3 = _stage(128, 256, 1)
        self.layer4 = _stage(256, 512, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Conv2d(512, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return torch.flatten(self.head(self.pool(x)), 1)


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """A freshly initialised model; `name` is one of MODEL_NAMES. Both expose `layer4`."""
    models = {RESNET18: ResNet18, RESNET18_ERA: ResNet18Era}
    if name not in models:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(MODEL_NAMES)})")
    return models[name](num_classes)
