"""Fills and slice assignments of the torch.export frontend: ``new_zeros``/``fill``/``copy``, ``slice_scatter``/``select_scatter``, ``masked_fill``.

What functionalization leaves of in-place code such as BART's ``shift_tokens_right``
(``shifted = ids.new_zeros(ids.shape)``, ``shifted[:, 1:] = ids[:, :-1]``, ``shifted[:, 0] = start``,
``shifted.masked_fill_(shifted == -100, pad)``), lowered to data movement paic already has:

* ``new_zeros/new_ones/new_full(x, size)`` and ``fill(x, v)``: a constant of the result's shape
  (broadcast over a batch-sized axis), whatever ``x`` holds;
* ``copy(x, src)``: ``src`` cast to ``x``'s dtype and expanded to its shape;
* ``slice_scatter(x, src, dim, start, end)`` (step 1) = ``concat(x[:start], src, x[end:])`` along
  ``dim``, and ``select_scatter(x, src, dim, i)`` = ``concat(x[:i], src.unsqueeze(dim), x[i + 1:])``;
* ``masked_fill(x, mask, v)`` = ``where(mask, v, x)`` (the interpreter's ``where``).

Each is what the values do, so paths follow values and integer data keeps its real value. A
bound that depends on the batch, or a strided assignment, stays opaque with the reason.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sympy
import torch

from pai_compiler.frontends.torch.index_ops import lower_where
from pai_compiler.frontends.torch.operands import TorchConst, cast_const, dtype_name, fold_at_batch
from pai_compiler.ir import Dim, Value

__all__ = ["ATEN_ASSIGN_RULES"]

Rule = Callable[..., Any]


def _filled(w: Any, n: Any, value: Any) -> TorchConst:
    """A constant of the node's (possibly batch-sized) shape and dtype, every entry ``value``."""
    shape = w.shape(n)
    dtype = n.meta["val"].dtype
    if isinstance(value, TorchConst):
        value = value.value.reshape(()).item()
    if all(isinstance(d, int) for d in shape):
        return TorchConst(torch.full(shape, value, dtype=dtype))
    return TorchConst(torch.full((), value, dtype=dtype), broadcast_to=tuple(shape))


def _new_filled(value: Any) -> Rule:
    return lambda w, n, a: _filled(w, n, a.get("fill_value", value))


def _fill(w: Any, n: Any, a: dict[str, Any]) -> Any:
    value = a["value"]
    if isinstance(value, Value) or (isinstance(value, TorchConst) and value.value.numel() != 1):
        return w.lw.opaque(n.name, [a["self"], value], [w.shape(n)], str(n.target), "fill with a run-time value")
    return _filled(w, n, value)


def _copy(w: Any, n: Any, a: dict[str, Any]) -> Any:
    """``copy(x, src)``: ``src`` in ``x``'s dtype and shape (``x``'s values are overwritten)."""
    src, shape, dtype = a["src"], w.shape(n), dtype_name(n.meta["val"])
    if isinstance(src, TorchConst):
        return w.lw.expand(n.name, cast_const(src, n.meta["val"].dtype), shape, w.origin(n))
    if src.dtype != dtype:
        src = w.lw.pointwise(f"{n.name}_cast", src, "cast", w.origin(n), to=dtype)
    return w.lw.expand(n.name, src, shape, w.origin(n))


def _narrow(w: Any, n: Any, x: Any, dim: int, start: int, end: int) -> Any:
    """``x[start:end]`` along ``dim`` (a constant stays a constant)."""
    shape: tuple[Dim, ...] = (*_shape_of(x)[:dim], end - start, *_shape_of(x)[dim + 1:])
    if isinstance(x, TorchConst):
        return fold_at_batch(n.name, lambda t: t.narrow(dim, start, end - start), ((x,), {}), w.example_batch, shape)
    return w.lw.slice(f"{n.name}_keep", x, dim, start, end, 1, shape, w.origin(n))


def _unsqueeze(w: Any, n: Any, x: Any, dim: int) -> Any:
    shape = (*_shape_of(x)[:dim], 1, *_shape_of(x)[dim:])
    if isinstance(x, TorchConst):
        return fold_at_batch(n.name, lambda t: t.unsqueeze(dim), ((x,), {}), w.example_batch, shape)
    return w.lw.reshape(f"{n.name}_unsqueeze", x, shape, w.origin(n))


def _shape_of(x: Any) -> tuple[Dim, ...]:
    """The (symbolic) shape of a Value or compile-time constant."""
    if isinstance(x, Value):
        return tuple(x.shape)
    return tuple(x.broadcast_to) if x.broadcast_to is not None else tuple(int(d) for d in x.value.shape)


def _scatter_into(w: Any, n: Any, x: Any, src: Any, dim: int, start: int, end: int) -> Any:
    """``x`` with ``src`` in place of ``x[start:end]`` along ``dim``: a concat of the kept parts and ``src``."""
    size = _shape_of(x)[dim]
    parts = [_narrow(w, n, x, dim, 0, start)] if start > 0 else []
    parts.append(src)
    if end < size:
        parts.append(_narrow(w, n, x, dim, end, size))
    if len(parts) == 1:
        return _copy(w, n, {"src": src})
    return w.lw.concat(n.name, parts, dim, w.shape(n), w.origin(n))


def _bounds(size: Dim, start: Any, end: Any) -> tuple[int, int] | None:
    """``(start, end)`` of ``x[start:end]`` on a dim of ``size`` as Python slices clamp them; None when
    a bound or a size it needs is symbolic."""
    start, end = (0 if start is None else start), (2**63 - 1 if end is None else end)
    if any(isinstance(v, sympy.Basic) for v in (start, end)):
        return None
    if not isinstance(size, int):
        return (0, 2**63 - 1) if start == 0 and end >= 2**62 else None  # the whole batch-sized dim
    first, last, _ = slice(int(start), int(end)).indices(size)
    return first, max(first, last)


def _slice_scatter(w: Any, n: Any, a: dict[str, Any]) -> Any:
    x, src = a["self"], a["src"]
    dim = int(a.get("dim") or 0) % len(_shape_of(x))
    bounds = _bounds(_shape_of(x)[dim], a.get("start"), a.get("end"))
    if (a.get("step") or 1) != 1 or bounds is None:
        why = "strided slice assignment" if (a.get("step") or 1) != 1 else "slice assignment with a batch-dependent bound"
        return w.lw.opaque(n.name, [x, src], [w.shape(n)], str(n.target), why)
    if bounds[1] >= 2**62:
        return _copy(w, n, {"src": src})
    return _scatter_into(w, n, x, src, dim, *bounds)


def _select_scatter(w: Any, n: Any, a: dict[str, Any]) -> Any:
    x, src = a["self"], a["src"]
    dim = int(a["dim"]) % len(_shape_of(x))
    size = _shape_of(x)[dim]
    if not isinstance(size, int):
        return w.lw.opaque(n.name, [x, src], [w.shape(n)], str(n.target), "assignment to one index of a batch-sized axis")
    index = int(a["index"]) % size
    return _scatter_into(w, n, x, _unsqueeze(w, n, src, dim), dim, index, index + 1)


def _masked_fill(w: Any, n: Any, a: dict[str, Any]) -> Any:
    """``where(mask, value, x)``; a number is a constant of the result's dtype."""
    value = a["value"]
    if not isinstance(value, (Value, TorchConst)):
        value = TorchConst(torch.tensor(value, dtype=n.meta["val"].dtype))
    return lower_where(w, n, a["mask"], value, a["self"], str(n.target))


ATEN_ASSIGN_RULES: dict[str, Rule] = {
    "new_zeros": _new_filled(0), "new_ones": _new_filled(1), "new_full": _new_filled(None), "fill": _fill,
    "copy": _copy, "slice_scatter": _slice_scatter, "select_scatter": _select_scatter, "masked_fill": _masked_fill,
}
