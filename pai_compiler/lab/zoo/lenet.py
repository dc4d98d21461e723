"""LeNet models for MNIST-sized inputs (1x28x28).

* :func:`lenet300` -- LeNet-300-100 (266,200 linear weights).
* :func:`lenet5` -- LeNet-5-Caffe (430,500 conv+linear weights).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LeNet300", "LeNet5", "lenet300", "lenet5"]


class LeNet300(nn.Module):
    """LeNet-300-100: flatten, ``fc1`` 784-300, ReLU, ``fc2`` 300-100, ReLU, ``fc3``."""

    def __init__(self, num_classes: int = 10, in_features: int = 784) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(x, 1)
        out = torch.relu(self.fc1(out))
        out = torch.relu(self.fc2(out))
        return self.fc3(out)


class LeNet5(nn.Module):
    """LeNet-5-Caffe: ``conv1`` 1-20 k5, pool, ``conv2`` 20-50 k5, pool, ``fc1``, ReLU, ``fc2``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool1(self.conv1(x))
        out = self.pool2(self.conv2(out))
        out = torch.flatten(out, 1)
        out = torch.relu(self.fc1(out))
        return self.fc2(out)


def lenet300(num_classes: int = 10) -> LeNet300:
    """LeNet-300-100 for 1x28x28 inputs (266,200 weights + 410 biases for 10 classes)."""
    return LeNet300(num_classes=num_classes)


def lenet5(num_classes: int = 10) -> LeNet5:
    """LeNet-5-Caffe for 1x28x28 inputs (430,500 weights + 580 biases for 10 classes)."""
    return LeNet5(num_classes=num_classes)
