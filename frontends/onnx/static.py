"""Static (compile-time) evaluation of ONNX subgraphs and symbolic shape arithmetic.

Shape-computation subgraphs (Shape -> Gather -> Concat -> Reshape ...) never reach the IR:
they are evaluated here on numpy arrays whose entries may be sympy expressions (dtype object)
so a dynamic batch stays a symbol. Constant weights are tracked with their origin (the
initializer or Constant output they come from) and the axis permutation applied on the way,
so a mask can be written back to the stored tensor.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from pai_compiler.errors import ModelError
from pai_compiler.ir import Dim
from pai_compiler.ir.dims import as_expr, floor_div, is_symbolic, sym
from pai_compiler.ir.dtypes import float_eps
from pai_compiler.ir.shape_program import gather_elements, gather_nd
from pai_compiler.onnx_wire import tensor_dtype

__all__ = ["Const", "STATIC_OPS", "eval_static", "concretize", "broadcast_shapes", "sym_floor_div", "simplify_dim", "prod", "is_float_dtype", "is_float_array"]


@dataclass
class Const:
    """A tensor known at compile time. ``origin``/``perm``: stored weight and its axis order.
    ``computed``: for a float tensor computed from constants (no single origin, e.g. a pruned
    weight ``Mul(mask, weight_orig)`` or weight norm's ``g * v / ||v||``), the ONNX value that
    holds it, so a layer reading it can own it as a weight (the backend rewires that input)."""

    array: np.ndarray
    origin: str | None = None
    perm: tuple[int, ...] | None = None
    broadcast_to: tuple[Dim, ...] | None = None  # Expand(const, symbolic shape)
    computed: str | None = None

    @property
    def symbolic(self) -> bool:
        return self.array.dtype == object

    @staticmethod
    def folded(array: np.ndarray, value: str) -> Const:
        """The folded ``array`` of ONNX value ``value``; a float one remembers where it was computed."""
        return Const(array, computed=value if is_float_array(np.asarray(array)) else None)


def is_float_array(array: np.ndarray) -> bool:
    """A numeric float array (not symbolic object data)."""
    return array.dtype != object and is_float_dtype(array.dtype)


def is_float_dtype(dtype: Any) -> bool:
    """True for numpy floats and ml_dtypes' low-precision floats."""
    return float_eps(dtype) is not None


def simplify_dim(d: Any) -> Dim:
    if isinstance(d, (int, np.integer)):
        return int(d)
    d = _simplify(as_expr(d))
    return int(d) if d.is_Integer else d


@lru_cache(maxsize=8192)
def _simplify(expr: Any) -> Any:
    # every transformer block repeats the same shape expressions; simplify is the loader's hot spot.
    # A number, a symbol or n·a·b… is already simplest (sympy builds it canonical): skipping
    # simplify there also skips its first-call import of sympy.physics (~0.3 s)
    if expr.is_Atom or (expr.is_Mul and all(a.is_Symbol or a.is_Integer for a in expr.args)):
        return expr
    return sym().simplify(expr)


def prod(dims: Sequence[Dim]) -> Dim:
    out: Any = 1
    for d in dims:
        out = out * d
    return simplify_dim(out)


def sym_floor_div(a: Dim, b: Dim) -> Dim:
    return simplify_dim(floor_div(a, b))


def broadcast_shapes(*shapes: Sequence[Dim]) -> tuple[Dim, ...]:
    rank = max(len(s) for s in shapes)
    out: list[Dim] = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        chosen: Dim = 1
        for d in dims:
            if d == 1:
                continue
            if chosen == 1:
                chosen = d
            elif isinstance(chosen, int) and isinstance(d, int) and chosen != d:
                raise ModelError(f"shapes {list(shapes)} do not broadcast")
        out.append(chosen)
    return tuple(out)


def _ints(a: np.ndarray) -> list[int]:
    return [int(x) for x in np.asarray(a).reshape(-1)]


def _axis_list(node_attrs: dict[str, Any], inputs: list[np.ndarray | None], index: int, key: str = "axes") -> list[int] | None:
    if len(inputs) > index and inputs[index] is not None:
        return _ints(inputs[index])  # type: ignore[arg-type]
    return node_attrs.get(key)


def _slice_arguments(x: list[Any], a: dict[str, Any]) -> tuple[list[int], list[int], list[int], list[int]]:
    """Slice's starts, ends, axes and steps: inputs 1-4 (opset 10+) or the attributes (Slice-1, which has no steps)."""
    starts, ends = _axis_list(a, x, 1, "starts") or [], _axis_list(a, x, 2, "ends") or []
    return starts, ends, _axis_list(a, x, 3) or list(range(len(starts))), _axis_list(a, x, 4, "steps") or [1] * len(starts)


def _reduce_axes(x: list[Any], a: dict[str, Any]) -> tuple[int, ...] | None:
    """A reduction's axes (the ``axes`` attribute, or input 1 from opset 18); None (all axes) when empty."""
    axes = _axis_list(a, x, 1)
    return tuple(axes) if axes else None


def _slice(x: np.ndarray, starts: list[int], ends: list[int], axes: list[int], steps: list[int]) -> np.ndarray:
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[a % x.ndim] = slice(s, e, st)
    return x[tuple(index)]


def _reshape(x: np.ndarray, shape: list[int], allowzero: int) -> np.ndarray:
    target = [x.shape[i] if (d == 0 and not allowzero) else d for i, d in enumerate(shape)]
    return x.reshape(target)


def _cast(x: np.ndarray, to: int) -> np.ndarray:
    if x.dtype == object:
        return x
    return x.astype(tensor_dtype(to))


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype == object or b.dtype == object:
        return np.vectorize(sym_floor_div, otypes=[object])(a, b)
    if np.issubdtype(a.dtype, np.integer):
        return (a // b).astype(a.dtype)
    return a / b


def _unary(x: np.ndarray, numeric: Callable[[np.ndarray], np.ndarray], symbolic: str) -> np.ndarray:
    """Sqrt/Floor/Ceil of static data: numpy's on numbers, sympy's function ``symbolic`` on symbolic sizes (object arrays)."""
    if x.dtype != object:
        return numeric(x)
    return np.vectorize(lambda v: getattr(sym(), symbolic)(v), otypes=[object])(x)


def _const_of_shape(shape: np.ndarray, value: Any) -> np.ndarray:
    fill = np.zeros(1, np.float32) if value is None else value.reshape(-1)
    return np.full([int(d) for d in shape.reshape(-1)], fill[0], dtype=fill.dtype)


_OpFn = Callable[[list[Any], dict[str, Any]], list[np.ndarray]]

STATIC_OPS: dict[str, _OpFn] = {
    "Identity": lambda x, a: [x[0]],
    "Shape": lambda x, a: [np.array(x[0].shape[a.get("start", 0) : a.get("end")], dtype=np.int64)],
    "Size": lambda x, a: [np.array(x[0].size, dtype=np.int64)],
    "Gather": lambda x, a: [np.take(x[0], x[1].astype(np.int64), axis=a.get("axis", 0))],
    "Concat": lambda x, a: [np.concatenate([v for v in x if v is not None], axis=a["axis"])],
    "Unsqueeze": lambda x, a: [np.expand_dims(x[0], tuple(sorted(i % (x[0].ndim + len(_ax(x, a))) for i in _ax(x, a))))],
    "Squeeze": lambda x, a: [np.squeeze(x[0], axis=tuple(_ax(x, a))) if _ax(x, a) else np.squeeze(x[0])],
    "Reshape": lambda x, a: [_reshape(x[0], _ints(x[1]), a.get("allowzero", 0))],
    "Transpose": lambda x, a: [np.transpose(x[0], a.get("perm"))],
    "Flatten": lambda x, a: [x[0].reshape(int(np.prod(x[0].shape[: a.get("axis", 1)])), -1)],
    "Cast": lambda x, a: [_cast(x[0], a["to"])],
    "CastLike": lambda x, a: [x[0] if x[0].dtype == object else x[0].astype(x[1].dtype)],
    "Slice": lambda x, a: [_slice(x[0], *_slice_arguments(x, a))],
    "Add": lambda x, a: [x[0] + x[1]],
    "Sub": lambda x, a: [x[0] - x[1]],
    "Mul": lambda x, a: [x[0] * x[1]],
    "Div": lambda x, a: [_div(x[0], x[1])],
    "Mod": lambda x, a: [np.mod(x[0], x[1])],
    "Neg": lambda x, a: [-x[0]],
    "Abs": lambda x, a: [np.abs(x[0])],
    "Sqrt": lambda x, a: [_unary(x[0], np.sqrt, "sqrt")],
    "Pow": lambda x, a: [np.power(x[0], x[1]).astype(x[0].dtype)],
    "Floor": lambda x, a: [_unary(x[0], np.floor, "floor")],
    "Ceil": lambda x, a: [_unary(x[0], np.ceil, "ceiling")],
    "Equal": lambda x, a: [np.equal(x[0], x[1])],
    "Less": lambda x, a: [np.less(x[0], x[1])],
    "Greater": lambda x, a: [np.greater(x[0], x[1])],
    "Not": lambda x, a: [np.logical_not(x[0])],
    "And": lambda x, a: [np.logical_and(x[0], x[1])],
    "Or": lambda x, a: [np.logical_or(x[0], x[1])],
    "Where": lambda x, a: [np.where(x[0], x[1], x[2])],
    "Max": lambda x, a: [np.maximum.reduce(x)],
    "Min": lambda x, a: [np.minimum.reduce(x)],
    "ConstantOfShape": lambda x, a: [_const_of_shape(x[0], a.get("value"))],
    "Range": lambda x, a: [np.arange(x[0].item(), x[1].item(), x[2].item())],
    "Expand": lambda x, a: [x[0] * np.ones([int(d) for d in _ints(x[1])], dtype=x[0].dtype)],
    "Tile": lambda x, a: [np.tile(x[0], _ints(x[1]))],
    "GatherElements": lambda x, a: [gather_elements(x[0], x[1], a.get("axis", 0))],
    "GatherND": lambda x, a: [gather_nd(x[0], x[1], int(a.get("batch_dims", 0)))],
    "IsNaN": lambda x, a: [np.isnan(x[0])],
    "ReduceProd": lambda x, a: [np.prod(x[0], axis=_reduce_axes(x, a), keepdims=bool(a.get("keepdims", 1)))],
}


def _ax(x: list[Any], a: dict[str, Any]) -> list[int]:
    axes = _axis_list(a, x, 1)
    return list(axes or [])


def concretize(a: np.ndarray) -> np.ndarray:
    """An object array whose entries are all plain integers becomes int64."""
    if a.dtype != object:
        return a
    flat = [simplify_dim(v) if isinstance(v, (int, np.integer)) or is_symbolic(v) else v for v in a.reshape(-1)]
    if all(isinstance(v, int) for v in flat):
        return np.array(flat, dtype=np.int64).reshape(a.shape)
    return np.array(flat, dtype=object).reshape(a.shape)


def eval_static(op_type: str, inputs: list[Const | None], attrs: dict[str, Any]) -> list[np.ndarray] | None:
    """Evaluate one node on known inputs, or return None when we have no rule for it."""
    fn = STATIC_OPS.get(op_type)
    arrays = [None if c is None else c.array for c in inputs]
    if fn is not None:
        try:
            with np.errstate(all="ignore"):  # log(0) = -inf in T5's relative buckets is the intended value, as in onnxruntime
                return [concretize(np.asarray(r)) for r in fn(arrays, attrs)]
        except (ValueError, TypeError, IndexError, KeyError, AttributeError):
            return None
    return None
