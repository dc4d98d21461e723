"""Output shapes and IR attrs of ONNX data-movement ops (reshape, flatten, transpose, squeeze, slice, gather, expand).

``MOVEMENT_RULES`` maps an op_type to its rule: (input shape, operands, ONNX attrs) -> (output
shape, the RESHAPE node's attrs). Reshape resolves ``0`` (copy, unless ``allowzero``) and ``-1``
(numel(in) / numel(known)); slice sizes are ``len(range(*slice(start, end, step).indices(d)))``, on
a symbolic dim ``d`` ``ceil((end' - start') / step)`` with a negative bound read as ``d + bound`` and
one past ``2^31`` as ``d`` (``ids[:, :-1]`` on a dynamic sequence is ``seq - 1``; the dim is taken to
hold the constant bounds, as the model's own code takes it to).
A rule raises :class:`DynamicArgument` for an argument known only at run time (or a shape it
cannot follow); the caller then keeps the node opaque.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pai_compiler.frontends.onnx.static import Const, broadcast_shapes, prod, simplify_dim
from pai_compiler.ir import Dim
from pai_compiler.ir.dims import as_expr, ceil_div, is_symbolic

__all__ = ["MOVEMENT_RULES", "DynamicArgument", "Movement", "movement_shape"]


class DynamicArgument(Exception):
    """An argument the shape depends on is not a compile-time constant (or not supported)."""


@dataclass(frozen=True)
class Movement:
    """One data-movement node: its input's shape, its operands and its ONNX attrs."""

    shape: tuple[Dim, ...] | None
    ins: list[Any]
    attrs: dict[str, Any]

    def const_ints(self, index: int, key: str) -> list[Any] | None:
        """Operand ``index`` as ints (symbolic sizes kept), else the attr ``key`` (older opsets)."""
        if len(self.ins) > index and self.ins[index] is not None:
            c = self.ins[index]
            if not isinstance(c, Const):
                raise DynamicArgument()
            return [v if is_symbolic(v) else int(v) for v in c.array.reshape(-1)]
        return self.attrs.get(key)

    def known_shape(self) -> tuple[Dim, ...]:
        if self.shape is None:
            raise DynamicArgument()
        return self.shape


Shaped = tuple[tuple[Dim, ...] | None, dict[str, Any]]
MovementRule = Callable[[Movement], Shaped]


def _resolve_reshape(in_shape: tuple[Dim, ...], target: list[Any], allowzero: bool) -> tuple[Dim, ...]:
    dims: list[Any] = [in_shape[i] if (not allowzero and t == 0) else t for i, t in enumerate(target)]
    if any(d == -1 for d in dims):
        known = prod([d for d in dims if d != -1])
        total = prod(in_shape)
        exact = isinstance(total, int) and isinstance(known, int) and known != 0 and total % known == 0
        dims[dims.index(-1)] = total // known if exact else simplify_dim(as_expr(total) / as_expr(known))
    return tuple(simplify_dim(d) for d in dims)


def _reshape(m: Movement) -> Shaped:
    target = m.const_ints(1, "shape")
    shape = _resolve_reshape(m.shape, target, bool(m.attrs.get("allowzero", 0))) if m.shape is not None else None
    return shape, {"op": "reshape"}


def _flatten(m: Movement) -> Shaped:
    s = m.shape
    axis = int(m.attrs.get("axis", 1)) if s is not None else 1
    axis = axis + len(s) if s is not None and axis < 0 else axis  # ONNX: axis in [-r, r]; r flattens to (N, 1)
    return ((prod(s[:axis]), prod(s[axis:])) if s is not None else None), {"op": "reshape"}


def _transpose(m: Movement) -> Shaped:
    s = m.shape
    perm = list(m.attrs.get("perm", list(reversed(range(len(s) if s else 0)))))
    return (tuple(s[p] for p in perm) if s is not None else None), {"op": "transpose", "perm": perm}


def _squeeze(m: Movement) -> Shaped:
    axes = m.const_ints(1, "axes")
    s = m.known_shape()
    axes = [a % len(s) for a in axes] if axes else [i for i, d in enumerate(s) if d == 1]
    return tuple(d for i, d in enumerate(s) if i not in axes), {"op": "reshape"}


def _unsqueeze(m: Movement) -> Shaped:
    axes = m.const_ints(1, "axes")
    s = m.known_shape()
    rank = len(s) + len(axes)
    axes = sorted(a % rank for a in axes)
    dims = iter(s)
    return tuple(1 if i in axes else next(dims) for i in range(rank)), {"op": "reshape"}


def _slice(m: Movement) -> Shaped:
    starts, ends = m.const_ints(1, "starts"), m.const_ints(2, "ends")
    axes = m.const_ints(3, "axes") or list(range(len(starts)))
    steps = m.const_ints(4, "steps") or [1] * len(starts)
    s = m.known_shape()
    axes = [a % len(s) for a in axes]
    shape = list(s)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if not isinstance(s[axis], int):
            if start == 0 and step == 1 and end >= 2**31 - 1:  # x[0:] on a symbolic dim: the whole dim
                continue
            shape[axis] = _symbolic_slice_size(s[axis], start, end, step)
            continue
        shape[axis] = len(range(*slice(start, end, step).indices(s[axis])))
    return tuple(shape), {"op": "slice", "starts": starts, "ends": ends, "axes": axes, "steps": steps}


def _symbolic_slice_size(size: Dim, start: Any, end: Any, step: Any) -> Dim:
    """``ceil((end' - start') / step)`` on a symbolic dim (a bound ``b < 0`` is ``size + b``, ``b >= 2^31 - 1`` is
    ``size``: INT64_MAX from torch, INT32_MAX from some converters). A positive end may clip or not depending
    on the size (``x[:, :5]`` on ``seq``): no single expression, so it stays a run-time argument."""
    if any(is_symbolic(v) for v in (start, end, step)) or step <= 0 or 0 <= end < 2**31 - 1:
        raise DynamicArgument()

    def bound(v: int) -> Any:
        return as_expr(size) if v >= 2**31 - 1 else (as_expr(size) + v if v < 0 else v)

    return simplify_dim(ceil_div(bound(end) - bound(start), step) if step > 1 else bound(end) - bound(start))


def _gather(m: Movement) -> Shaped:
    idx, s = m.ins[1], m.shape
    if not isinstance(idx, Const) or idx.symbolic:
        raise DynamicArgument()
    axis = int(m.attrs.get("axis", 0)) % len(s)  # type: ignore[arg-type]
    indices = idx.array.astype(np.int64)
    shape = (*s[:axis], *indices.shape, *s[axis + 1 :])  # type: ignore[index]
    return shape, {"op": "gather", "axis": axis, "indices": indices.tolist(), "indices_shape": list(indices.shape)}


def _expand(m: Movement) -> Shaped:
    return broadcast_shapes(m.shape, m.const_ints(1, "shape")), {"op": "expand"}


#: ONNX op_type -> its shape rule
MOVEMENT_RULES: dict[str, MovementRule] = {
    "Reshape": _reshape, "Flatten": _flatten, "Transpose": _transpose, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Slice": _slice, "Gather": _gather, "Expand": _expand,
}


def movement_shape(op_type: str, movement: Movement) -> Shaped:
    """(output shape, RESHAPE attrs) of a data-movement node; a reshape's attrs carry its target ``shape``."""
    rule = MOVEMENT_RULES.get(op_type)
    if rule is None:
        raise DynamicArgument()
    shape, attrs = rule(movement)
    if attrs["op"] == "reshape":
        attrs["shape"] = list(shape) if shape is not None else None
    return shape, attrs
