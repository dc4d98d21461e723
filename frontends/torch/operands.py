"""Compile-time operands of the torch frontends: constants, the module handle, example inputs, permutations.

``TorchConst`` is a parameter/buffer (``fqn``) or literal seen through ``perm`` (its axes after
``t()``/``permute``) and ``broadcast_to`` (after ``expand``); ``BATCH`` is the symbolic batch
size every traced shape is fitted in (``a*batch + c``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch import nn

from pai_compiler.errors import ModelError
from pai_compiler.ir import Dim

__all__ = ["BATCH", "ModuleHandle", "TorchConst", "AttentionWeights", "example_inputs", "dtype_name", "perm_of"]

BATCH = sympy.Symbol("batch", integer=True, positive=True)


class ModuleHandle:
    """The source ``nn.Module`` of a lowered graph: shared (not copied) by ``Graph.clone``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __deepcopy__(self, memo: dict[int, Any]) -> ModuleHandle:
        return self

    def __reduce__(self) -> Any:  # the module is a live object, never part of a saved graph
        raise TypeError("ModuleHandle is not serialisable")

    def __repr__(self) -> str:
        return f"ModuleHandle({type(self.module).__name__})"


@dataclass
class TorchConst:
    """A compile-time tensor operand: a parameter/buffer (``fqn``) or a literal (``fqn=None``).

    ``perm`` maps the operand's axes to the stored tensor's axes (after ``t()``/``permute``);
    ``broadcast_to`` is the symbolic shape after an ``expand`` (class tokens).
    """

    tensor: torch.Tensor
    fqn: str | None = None
    perm: tuple[int, ...] | None = None
    broadcast_to: tuple[Dim, ...] | None = None

    @property
    def value(self) -> torch.Tensor:
        t = self.tensor if self.perm is None else self.tensor.permute(self.perm)
        return t


class AttentionWeights:
    """Marker for ``nn.MultiheadAttention``'s second output, which paic does not model."""

    def __init__(self, label: str) -> None:
        self.label = label


def example_inputs(example: Any) -> tuple[torch.Tensor, ...]:
    """Normalise an example input (a tensor, a tuple of tensors, or a shape) to a tuple."""
    if isinstance(example, torch.Tensor):
        return (example,)
    if isinstance(example, (tuple, list)) and example and all(isinstance(d, int) for d in example):
        return (torch.randn(tuple(example), generator=torch.Generator().manual_seed(0)),)
    if isinstance(example, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example):
        return tuple(example)
    raise ModelError(f"example input must be a tensor, a tuple of tensors or a shape, got {type(example).__name__}")


def dtype_name(t: Any) -> str:
    """A tensor's dtype as paic names it (``float32``); no dtype reads as float32."""
    return str(getattr(t, "dtype", torch.float32)).removeprefix("torch.")


def perm_of(kind: str, rank: int, rest: Sequence[Any]) -> list[int]:
    """The axis permutation of ``t``/``T``/``transpose(a, b)``/``permute(dims)`` on a tensor of ``rank`` axes."""
    if kind == "t" or (kind == "T"):
        return list(reversed(range(rank)))
    if kind == "transpose":
        a, b = int(rest[0]) % rank, int(rest[1]) % rank
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    return [int(d) % rank for d in dims]
