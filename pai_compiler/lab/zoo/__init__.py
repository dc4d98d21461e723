"""In-repo model zoo for pruning-at-initialization experiments.

The zoo provides small, dependency-free (torch only, no torchvision) model
definitions that are commonly used in the pruning-at-initialization
literature (OpenLTH, Synaptic-Flow, DPaI):

* ``resnet20``  -- CIFAR ResNet-20 (OpenLTH / Synaptic-Flow layout)
* ``resnet18``  -- CIFAR-style ResNet-18 (3x3 stem, no max-pool)
* ``resnet50``  -- ImageNet ResNet-50 (torchvision architecture)
* ``vgg19``     -- CIFAR VGG-19 (optionally with BatchNorm; DPaI reference)
* ``vgg_small`` -- a small VGG-style chain for quick tests
* ``tiny_vit``  -- a tiny Vision Transformer for quick tests
* ``vit_b16``   -- ViT-B/16 (ImageNet resolution)
* ``lenet300``  -- LeNet-300-100 (MNIST)
* ``lenet5``    -- LeNet-5-Caffe (MNIST)

Importing this package does **not** import torch: the submodules (and the
factories they define) are loaded lazily on first attribute access, and
:func:`build` imports the required submodule on demand.

Example::

    from pai_compiler.lab import zoo

    model = zoo.build("resnet20", num_classes=10)
    shape = zoo.input_shape("resnet20")  # (3, 32, 32)
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from .lenet import lenet5, lenet300
    from .resnet import resnet18, resnet20, resnet50
    from .vgg import vgg19, vgg_small
    from .vit import tiny_vit, vit_b16

__all__ = [
    "MODELS",
    "build",
    "input_shape",
    "resnet20",
    "resnet18",
    "resnet50",
    "vgg19",
    "vgg_small",
    "tiny_vit",
    "vit_b16",
    "lenet300",
    "lenet5",
]

#: Registry: model name -> (submodule name inside ``pai_compiler.lab.zoo``,
#: factory function name, default input shape without the batch dimension).
MODELS: dict[str, tuple[str, str, tuple[int, ...]]] = {
    "resnet20": ("resnet", "resnet20", (3, 32, 32)),
    "resnet18": ("resnet", "resnet18", (3, 32, 32)),
    "resnet50": ("resnet", "resnet50", (3, 224, 224)),
    "vgg19": ("vgg", "vgg19", (3, 32, 32)),
    "vgg_small": ("vgg", "vgg_small", (3, 32, 32)),
    "tiny_vit": ("vit", "tiny_vit", (3, 32, 32)),
    "vit_b16": ("vit", "vit_b16", (3, 224, 224)),
    "lenet300": ("lenet", "lenet300", (1, 28, 28)),
    "lenet5": ("lenet", "lenet5", (1, 28, 28)),
}

_SUBMODULES: frozenset[str] = frozenset({"resnet", "vgg", "vit", "lenet"})


def _import_submodule(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def _lookup(name: str) -> tuple[str, str, tuple[int, ...]]:
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise KeyError(f"unknown zoo model {name!r}; known models: {known}") from None


def build(name: str, **kwargs: Any) -> torch.nn.Module:
    """Build the zoo model ``name``; ``kwargs`` are passed to its factory.

    Seed torch (``torch.manual_seed``) beforehand for a deterministic init.
    """
    module_name, factory_name, _ = _lookup(name)
    factory = getattr(_import_submodule(module_name), factory_name)
    model: torch.nn.Module = factory(**kwargs)
    return model


def input_shape(name: str) -> tuple[int, ...]:
    """Default input shape (without batch dimension) of the zoo model ``name``."""
    return _lookup(name)[2]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = _import_submodule(name)
        globals()[name] = module
        return module
    if name not in MODELS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, factory_name, _ = MODELS[name]
    value = getattr(_import_submodule(module_name), factory_name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
