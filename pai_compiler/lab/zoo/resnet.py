"""ResNet models: CIFAR ResNet-20, CIFAR-style ResNet-18 and ImageNet ResNet-50.

* :func:`resnet20` follows OpenLTH / Synaptic-Flow (``cifar_resnet_20``):
  3x3 stem with 16 channels, three stages of three BasicBlocks (16/32/64),
  1x1 conv + BN projection shortcuts only where the shape changes.
  270,896 conv+linear weights for 10 classes.
* :func:`resnet18` is the CIFAR-style ResNet-18 (3x3 stride-1 stem, no
  max-pool, BasicBlocks 64/128/256/512 x 2, bias-free classifier):
  11,159,232 + 512 * C conv+linear weights (11,164,352 for C=10,
  11,261,632 for C=200).
* :func:`resnet50` is the torchvision ImageNet ResNet-50 architecture
  (25,557,032 parameters, 4,089,184,256 conv+linear MACs at 1x3x224x224),
  re-implemented here without depending on torchvision.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "ResNet",
    "ImageNetResNet",
    "resnet20",
    "resnet18",
    "resnet50",
]


def _kaiming_init(model: nn.Module) -> None:
    """Kaiming-normal conv/linear weights, zero biases, BN weight 1 / bias 0."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual connection.

    The shortcut is a 1x1 conv (no bias) + BN when the spatial size or the
    channel count changes and the identity otherwise.  It is defined after
    ``conv1``/``conv2`` so that ``model.modules()`` lists it after them.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """OpenLTH-style CIFAR ResNet: stem ``conv``/``bn``, flat ``blocks``, ``fc``."""

    def __init__(self, depth: int = 20, widths: tuple[int, ...] = (16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks: list[nn.Module] = []
        in_planes = widths[0]
        for stage, width in enumerate(widths):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(in_planes, width, stride))
                in_planes = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.conv(x)))
        out = self.blocks(out)
        out = torch.flatten(self.pool(out), 1)
        return self.fc(out)


class ResNet(nn.Module):
    """CIFAR-style ResNet with BasicBlocks: ``conv1``/``bn1``, ``layer1..4``, ``fc``."""

    def __init__(
        self,
        num_blocks: tuple[int, ...] = (2, 2, 2, 2),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for stage, (count, width) in enumerate(zip(num_blocks, widths)):
            layer: list[nn.Module] = []
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                layer.append(BasicBlock(in_planes, width, stride))
                in_planes = width
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layer))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes, bias=False)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        for stage in range(self.num_stages):
            out = getattr(self, f"layer{stage + 1}")(out)
        out = torch.flatten(self.avgpool(out), 1)
        return self.fc(out)


class Bottleneck(nn.Module):
    """torchvision ResNet v1.5 bottleneck (stride on the 3x3 conv), expansion 4."""

    expansion: int = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=False)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ImageNetResNet(nn.Module):
    """torchvision-layout ImageNet ResNet built from :class:`Bottleneck` blocks."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_planes = 64
        for stage, count in enumerate(layers):
            planes = 64 * 2**stage
            layer: list[nn.Module] = []
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                layer.append(Bottleneck(in_planes, planes, stride))
                in_planes = planes * Bottleneck.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layer))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(self.num_stages):
            out = getattr(self, f"layer{stage + 1}")(out)
        out = torch.flatten(self.avgpool(out), 1)
        return self.fc(out)


def resnet20(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-20 (OpenLTH ``cifar_resnet_20``); input 3x32x32.

    270,896 conv+linear weights (272,474 parameters) for 10 classes.
    """
    return CifarResNet(depth=20, widths=(16, 32, 64), num_classes=num_classes)


def resnet18(num_classes: int = 10) -> ResNet:
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool, bias-free fc); input 3x32x32.

    11,159,232 + 512 * num_classes conv+linear weights
    (11,164,352 for 10 classes, 11,261,632 for 200 classes).
    """
    return ResNet(num_blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), num_classes=num_classes)


def resnet50(num_classes: int = 1000) -> ImageNetResNet:
    """ImageNet ResNet-50 (torchvision architecture); input 3x224x224.

    25,557,032 parameters and 4,089,184,256 conv+linear MACs at batch 1
    for 1000 classes.
    """
    return ImageNetResNet(layers=(3, 4, 6, 3), num_classes=num_classes)
