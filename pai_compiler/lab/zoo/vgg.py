"""VGG-style models: CIFAR VGG-19 (DPaI reference) and a small test VGG.

* :func:`vgg19` -- CIFAR VGG-19: 16 conv3x3 (bias) [+ BN] + ReLU layers in
  five stages (64x2, 128x2, 256x4, 512x4, 512x4), MaxPool2d(2) after the first
  four stages, AvgPool2d(2) after the fifth, then ``Linear(512, num_classes)``.
  20,018,880 + 512 * C conv+linear weights (20,070,080 for CIFAR-100).
* :func:`vgg_small` -- five conv layers and a two-layer MLP head for quick
  tests (input 3x32x32).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGG", "VGG19_CFG", "vgg19", "vgg_small"]

#: VGG-19 layer configuration: ints are conv output channels, "M" a 2x2
#: max-pool and "A" a 2x2 average pool (replacing the final max-pool).
VGG19_CFG: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, 256, "M",
    512, 512, 512, 512, "M",
    512, 512, 512, 512, "A",
)  # fmt: skip


def _make_layers(cfg: tuple[int | str, ...], in_channels: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        elif item == "A":
            layers.append(nn.AvgPool2d(2))
        else:
            assert isinstance(item, int)
            layers.append(nn.Conv2d(channels, item, 3, padding=1, bias=True))
            if batch_norm:
                layers.append(nn.BatchNorm2d(item))
            layers.append(nn.ReLU(inplace=False))
            channels = item
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG feature extractor ``features`` followed by a ``classifier`` head."""

    def __init__(self, features: nn.Sequential, classifier: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(self.features(x), 1)
        return self.classifier(out)


def vgg19(num_classes: int = 10, batch_norm: bool = True) -> VGG:
    """CIFAR VGG-19 (DPaI reference ``vgg19_bn`` when ``batch_norm``); input 3x32x32.

    20,018,880 + 512 * num_classes conv+linear weights
    (20,070,080 for 100 classes).
    """
    features = _make_layers(VGG19_CFG, 3, batch_norm)
    return VGG(features, nn.Linear(512, num_classes))


def vgg_small(num_classes: int = 10) -> VGG:
    """Small VGG-style chain for quick tests; input 3x32x32.

    conv(3,16) conv(16,16) pool conv(16,32) conv(32,32) pool conv(32,64)
    (each conv3x3 + BN + ReLU), global average pool, Linear(64,64), ReLU,
    Linear(64, num_classes).
    """
    features = nn.Sequential(
        *_make_layers((16, 16, "M", 32, 32, "M", 64), 3, batch_norm=True),
        nn.AdaptiveAvgPool2d(1),
    )
    classifier = nn.Sequential(
        nn.Linear(64, 64),
        nn.ReLU(inplace=False),
        nn.Linear(64, num_classes),
    )
    return VGG(features, classifier)
