"""A tensor's recipe from shape symbols: an ONNX model fed with symbolic shape vectors at their bound sizes.

The attribute of an ``opaque`` node with ``op="shape_data"`` (positions ``Range(0, seq)``, a
table cut to the sequence, an attention mask expanded to ``(batch, 1, seq, seq)``): the value
depends on the bound sizes only, never on model data. ``feeds`` names each graph input of the
serialized ``model`` with its shape and its entries (ints or sympy expressions over the
model's symbols); the interpreter evaluates the entries at its binding and runs the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ShapeProgram", "Feed", "gather_elements", "gather_nd"]

#: (graph input name, its shape, its flattened entries: ints or sympy expressions)
Feed = tuple[str, tuple[int, ...], tuple[Any, ...]]


@dataclass(frozen=True)
class ShapeProgram:
    """A serialized ONNX ``model`` with int64 inputs ``feeds``; ``size`` nodes (for printing)."""

    model: bytes
    feeds: tuple[Feed, ...]
    size: int

    def __str__(self) -> str:
        symbols = sorted({str(s) for _, _, entries in self.feeds for e in entries for s in getattr(e, "free_symbols", ())})
        return f"program({self.size} ops; {','.join(symbols) or 'no symbols'})"


def gather_elements(data: np.ndarray, indices: np.ndarray, axis: int = 0) -> np.ndarray:
    """ONNX GatherElements: ``out[i][j] = data[indices[i][j]][j]`` (axis 0), the indices possibly
    smaller than ``data`` on the other axes and negative (counted from the end)."""
    axis %= data.ndim
    window = tuple(slice(None) if i == axis else slice(0, n) for i, n in enumerate(indices.shape))
    idx = np.asarray(indices, dtype=np.int64)
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    return np.take_along_axis(data[window], idx, axis=axis)


def gather_nd(data: np.ndarray, indices: np.ndarray, batch_dims: int = 0) -> np.ndarray:
    """ONNX GatherND: ``out[b..., i...] = data[b..., *indices[b..., i..., :]]`` (``b``: the first
    ``batch_dims`` axes, shared); the last axis of ``indices`` (length k) addresses data's next k
    axes, negative entries counted from the end."""
    k = indices.shape[-1]
    batch = int(np.prod(data.shape[:batch_dims], dtype=np.int64))
    rows = np.asarray(indices, dtype=np.int64).reshape(batch, -1, k)
    rows = np.where(rows < 0, rows + np.asarray(data.shape[batch_dims:batch_dims + k]), rows)
    flat = data.reshape(batch, *data.shape[batch_dims:])
    picked = flat[(np.arange(batch)[:, None], *np.moveaxis(rows, -1, 0))]
    return picked.reshape(*indices.shape[:-1], *data.shape[batch_dims + k:])
