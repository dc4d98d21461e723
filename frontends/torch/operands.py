"""Compile-time operands of the torch frontends: constants, the module handle, example inputs, permutations.

``TorchConst`` is a parameter/buffer (``fqn``) or literal seen through ``perm`` (its axes after
``t()``/``permute``) and ``broadcast_to`` (after ``expand``); ``BATCH`` is the symbolic batch
size every traced shape is fitted in (``a*batch + c``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch import nn

from pai_compiler.errors import ModelError
from pai_compiler.ir import Dim

__all__ = ["BATCH", "ModuleHandle", "TorchConst", "AttentionWeights", "Example", "example_inputs", "normalize_example",
           "dtype_name", "perm_of", "fold_at_batch", "cast_const"]

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
    ``broadcast_to`` is the symbolic shape after an ``expand`` (class tokens); ``varies_at_batch``
    marks a value computed at the example batch that differs per sample (``arange(batch)``):
    static code may use it, and it is refused where it would become part of the model.
    """

    tensor: torch.Tensor
    fqn: str | None = None
    perm: tuple[int, ...] | None = None
    broadcast_to: tuple[Dim, ...] | None = None
    varies_at_batch: int | None = None  # the value at this example batch of a constant that changes with the batch


    @property
    def value(self) -> torch.Tensor:
        t = self.tensor if self.perm is None else self.tensor.permute(self.perm)
        return t


class AttentionWeights:
    """Marker for ``nn.MultiheadAttention``'s second output, which paic does not model."""

    def __init__(self, label: str) -> None:
        self.label = label


@dataclass(frozen=True)
class Example:
    """A model call's example inputs: positional tensors, then keyword tensors (a dict's items, in order)."""

    positional: tuple[torch.Tensor, ...]
    keywords: dict[str, torch.Tensor]

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every input tensor, positional first: the order of the graph's inputs."""
        return (*self.positional, *self.keywords.values())

    @property
    def batch(self) -> int:
        """The example batch (dim 0 of the first input; 1 for a scalar)."""
        first = self.tensors[0]
        return int(first.shape[0]) if first.dim() else 1

    def mapped(self, fn: Any) -> Example:
        """The same call with ``fn`` applied to every tensor."""
        return Example(tuple(fn(t) for t in self.positional), {k: fn(t) for k, t in self.keywords.items()})


def normalize_example(example: Any) -> Example:
    """An example input as a call: a dict is keyword inputs, a tensor/tuple/shape positional ones."""
    if isinstance(example, dict):
        bad = [str(k) for k, t in example.items() if not isinstance(k, str) or not isinstance(t, torch.Tensor)]
        if bad or not example:
            raise ModelError(f"example input dict must map argument names to tensors (bad entries: {', '.join(bad) or 'none given'})")
        return Example((), dict(example))
    return Example(example_inputs(example), {})


def example_inputs(example: Any) -> tuple[torch.Tensor, ...]:
    """Normalise a positional example input (a tensor, a tuple of tensors, or a shape) to a tuple."""
    if isinstance(example, torch.Tensor):
        return (example,)
    if isinstance(example, (tuple, list)) and example and all(isinstance(d, int) for d in example):
        return (torch.randn(tuple(example), generator=torch.Generator().manual_seed(0)),)
    if isinstance(example, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example):
        return tuple(example)
    raise ModelError(f"example input must be a tensor, a tuple of tensors, a dict of named tensors or a shape, got {type(example).__name__}")


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


def _concrete(a: Any, batch: int) -> Any:
    """``a`` at a concrete batch: symbolic sizes substituted, expanded constants materialised."""
    if isinstance(a, sympy.Basic):
        return int(a.subs(BATCH, batch))
    if isinstance(a, TorchConst):
        if a.varies_at_batch is not None and a.varies_at_batch != batch:
            raise ModelError(f"a constant computed at batch {a.varies_at_batch} is used at batch {batch}")
        if a.broadcast_to is None:
            return a.value
        return a.value.expand(tuple(_concrete(d, batch) for d in a.broadcast_to))
    return a


def cast_const(c: TorchConst, dtype: torch.dtype) -> TorchConst:
    """``c`` in ``dtype``, still a constant: its axis order applied, its broadcast and its example-batch
    mark kept (a cast ``arange(batch)`` still varies with the batch); no longer a parameter (no FQN)."""
    if c.tensor.dtype == dtype:
        return c
    return TorchConst(c.value.to(dtype), None, None, c.broadcast_to, c.varies_at_batch)


def fold_at_batch(label: str, fn: Callable[..., Any], plain: tuple[Any, Any], batch: int, shape: Any) -> Any:
    """Evaluate ``fn(*args, **kwargs)`` on constants some of whose sizes are the batch.

    The call runs at the example ``batch``; a tensor result that is the same along every
    batch-sized axis of its symbolic ``shape`` (position ids expanded over the batch, a
    buffered ``token_type_ids`` gathered by them) folds to one slice broadcast to ``shape``.
    One that varies along the batch (``arange(batch)``) is kept at the example batch and marked
    ``varies_at_batch``: the lowering refuses it if it ever reaches the model's computation.
    """
    args, kwargs = torch.utils._pytree.tree_map(lambda a: _concrete(a, batch), plain, is_leaf=lambda a: isinstance(a, TorchConst))
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:
        raise ModelError(f"{label}: cannot evaluate {fn} on constants at batch {batch} ({type(exc).__name__}: {exc})") from None
    if not isinstance(result, torch.Tensor):
        return result
    result = result.detach()
    if not isinstance(shape, tuple) or len(shape) != result.dim():
        return TorchConst(result)
    folded = result
    for axis, dim in enumerate(shape):
        if isinstance(dim, int):
            continue
        first = folded.narrow(axis, 0, 1)
        if not torch.equal(folded, first.expand_as(folded)):
            return TorchConst(result, varies_at_batch=batch)  # fine while only static code reads it
        folded = first
    return TorchConst(folded, None, None, tuple(shape)) if folded.shape != result.shape or any(not isinstance(d, int) for d in shape) else TorchConst(result)
