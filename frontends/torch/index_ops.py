"""Index-data rules of both torch frontends: comparisons, ``cumsum``, ``gather``, ``argmax`` on integer/bool tensors, ``where`` on a mask,
and advanced indexing by constants or per sample (``lower_index``).

Position ids computed from the inputs (RoBERTa, OPT: ``mask = ids.ne(pad)``,
``positions = cumsum(mask) * mask + pad``) and the token-type ids gathered by them lower to
opaque nodes with real semantics (``op="compare"`` with ``fn``, ``op="cumsum"``,
``op="gather_elements"``) that the interpreter runs in both modes, so an embedding read
through such positions is a path source like any other lookup of the ids.
``ATEN_INDEX_RULES`` take ``(walker, node, bound-arguments)`` (torch.export),
``FX_INDEX_RULES`` take ``(walker, node, *args, **kwargs)`` (torch.fx).
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import sympy
import torch

from pai_compiler.frontends.torch.operands import BATCH, TorchConst, dtype_name
from pai_compiler.ir import Value

__all__ = ["ATEN_INDEX_RULES", "FX_INDEX_RULES", "COMPARE_NAMES", "BITWISE_NAMES", "lower_compare", "lower_where", "lower_index"]

Rule = Callable[..., Any]

#: ATen / Tensor method name -> the interpreter's ``compare`` function
COMPARE_NAMES = {"eq": "eq", "ne": "ne", "lt": "lt", "le": "le", "gt": "gt", "ge": "ge", "logical_not": "not",
                 "logical_and": "and", "logical_or": "or", "logical_xor": "xor"}
#: bitwise spellings that are logical only on bool tensors (``mask_a | mask_b``, ``~mask``)
BITWISE_NAMES = {"bitwise_and": "and", "__and__": "and", "bitwise_or": "or", "__or__": "or", "bitwise_xor": "xor", "__xor__": "xor", "bitwise_not": "not"}
_MIRROR = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}


def _out_dtype(w: Any, n: Any) -> str | None:
    """The node's result dtype: ``meta["val"]`` (torch.export) or the fx walker's shape propagation."""
    val = n.meta.get("val")
    if isinstance(val, torch.Tensor):
        return dtype_name(val)
    meta = getattr(w, "metas", {}).get(n.name)
    return getattr(meta, "dtype", None)


def _is_index(x: Any) -> bool:
    return isinstance(x, Value) and not x.dtype.startswith(("float", "bfloat"))


def lower_compare(w: Any, n: Any, fn: str, x: Any, other: Any, origin: str, *, bool_only: bool = False) -> Any:
    """``fn(x, other)`` as an ``op="compare"`` node (a scalar operand becomes ``attrs["scalar"]``);
    ``bool_only``: a bitwise op, logical only when every tensor operand is bool."""
    if not isinstance(x, Value) and isinstance(other, Value):
        x, other, fn = other, x, _MIRROR.get(fn, fn)
    if bool_only and any(isinstance(t, Value) and t.dtype != "bool" for t in (x, other)):
        return w.lw.opaque(n.name, [t for t in (x, other) if isinstance(t, (Value, TorchConst))], [w.shape(n)], origin, "bitwise op on integers")
    if not isinstance(x, Value):
        return w.lw.opaque(n.name, [t for t in (x, other) if isinstance(t, TorchConst)], [w.shape(n)], origin, "comparison of constants")
    if fn == "not":
        return w.lw.index_op(n.name, "compare", [x], w.shape(n), origin, "bool", fn=fn)
    if isinstance(other, (Value, TorchConst)):
        return w.lw.index_op(n.name, "compare", [x, other], w.shape(n), origin, "bool", fn=fn)
    if isinstance(other, (bool, int, float)):
        return w.lw.index_op(n.name, "compare", [x], w.shape(n), origin, "bool", fn=fn, scalar=other)
    return w.lw.opaque(n.name, [x], [w.shape(n)], origin, f"comparison with {type(other).__name__}")


def _cumsum(w: Any, n: Any, x: Any, dim: int, origin: str) -> Any:
    if not _is_index(x):
        return w.lw.opaque(n.name, [x], [w.shape(n)], origin, "cumsum of floats (only integer/bool index data has a rule)")
    return w.lw.index_op(n.name, "cumsum", [x], w.shape(n), origin, _out_dtype(w, n) or "int64", axis=int(dim))


def _arg_reduce(w: Any, n: Any, fn: str, x: Any, dim: Any, keepdim: bool, origin: str) -> Any:
    if not _is_index(x) or dim is None:
        return w.lw.opaque(n.name, [x], [w.shape(n)], origin, f"arg{fn} of floats or of the flattened tensor (only integer/bool index data along an axis has a rule)")
    return w.lw.index_op(n.name, "arg_reduce", [x], w.shape(n), origin, "int64", fn=fn, axis=int(dim), keepdims=bool(keepdim))


def _gather(w: Any, n: Any, data: Any, dim: int, index: Any, origin: str) -> Any:
    if not isinstance(index, Value) or not isinstance(data, (Value, TorchConst)):
        return w.lw.opaque(n.name, [t for t in (data, index) if isinstance(t, (Value, TorchConst))], [w.shape(n)], origin, "gather of constants")
    return w.lw.index_op(n.name, "gather_elements", [data, index], w.shape(n), origin, _out_dtype(w, n) or "int64", axis=int(dim))


def lower_index(w: Any, n: Any, a: dict[str, Any]) -> Any:
    """ATen ``index`` (advanced indexing), three forms; any other stays opaque:

    * ``x[arange(batch)[:, None, ...], idx]`` with constant ``idx``: each sample's own row, a gather on
      axis 1 (the attention-mask builders of Hugging Face models index a padding mask this way);
    * ``x[arange(batch), picks]`` with run-time ``picks``: ``_per_sample_pick``;
    * constant index tensors on adjacent static axes: ``_constant_index``.
    """
    x, indices = a["self"], list(a["indices"])
    shape = w.shape(n)
    if isinstance(x, Value) and len(indices) == 2 and all(isinstance(i, TorchConst) for i in indices):
        rows, cols = indices[0], indices[1]
        rows_t = rows.value if rows.broadcast_to is None else rows.value.expand(tuple(int(d.subs(BATCH, w.example_batch)) if isinstance(d, sympy.Basic) else d for d in rows.broadcast_to))
        cols_t = cols.value
        per_sample = torch.arange(rows_t.shape[0]).reshape(-1, *([1] * (rows_t.dim() - 1))) if rows_t.dim() else None
        if (per_sample is not None and rows_t.shape[0] == w.example_batch and torch.equal(rows_t, per_sample.expand_as(rows_t))
                and cols.broadcast_to is None and cols_t.dim() == rows_t.dim() and cols_t.shape[0] == 1 and all(s == 1 for s in rows_t.shape[1:])):
            return w.lw.gather(n.name, x, 1, cols_t[0].long(), shape, w.origin(n))
    picks = indices[1] if len(indices) == 2 else None
    if (isinstance(x, Value) and _is_batch_arange(w, indices[0]) and isinstance(picks, Value) and picks.shape is not None
            and len(picks.shape) == 1 and picks.shape[0] == x.shape[0]):
        return _per_sample_pick(w, n, x, picks, shape)
    constant = _constant_index(w, n, x, indices, shape)
    if constant is not None:
        return constant
    items = [x, *[i for i in indices if isinstance(i, (Value, TorchConst))]]
    return w.lw.opaque(n.name, items, [shape], str(n.target), "advanced indexing other than a per-sample gather")


def _constant_index(w: Any, n: Any, x: Any, indices: list[Any], shape: tuple[Any, ...]) -> Value | None:
    """``x[..., i0, i1, ...]`` with constant index tensors on adjacent static axes (im2col's
    decomposition): those axes merged into one and gathered at the linear index
    ``sum_k i_k * stride_k``; None when the indexing is of another kind."""
    at = [k for k, i in enumerate(indices) if i is not None]
    if not isinstance(x, Value) or not at or at != list(range(at[0], at[-1] + 1)):
        return None
    consts = [indices[k] for k in at]
    sizes = [x.shape[k] for k in at]
    if not all(isinstance(c, TorchConst) and c.broadcast_to is None and c.varies_at_batch is None for c in consts) or not all(isinstance(d, int) for d in sizes):
        return None
    parts = torch.broadcast_tensors(*[c.value.long() for c in consts])
    linear = torch.zeros_like(parts[0])
    for part, size in zip(parts, sizes):
        linear = linear * size + torch.where(part < 0, part + size, part)
    a = at[0]
    if tuple(shape) != (*x.shape[:a], *linear.shape, *x.shape[at[-1] + 1:]):
        return None
    merged = w.lw.reshape(f"{n.name}_merge", x, (*x.shape[:a], math.prod(sizes), *x.shape[at[-1] + 1:]), w.origin(n))
    return w.lw.gather(n.name, merged, a, linear, shape, w.origin(n))


def _is_batch_arange(w: Any, rows: Any) -> bool:
    """``rows`` is ``arange(batch)`` (a constant computed at the example batch)."""
    return (isinstance(rows, TorchConst) and rows.varies_at_batch is not None and rows.broadcast_to is None and rows.value.dim() == 1
            and rows.value.shape[0] == w.example_batch and torch.equal(rows.value.long(), torch.arange(w.example_batch)))


def _per_sample_pick(w: Any, n: Any, x: Value, picks: Value, shape: tuple[Any, ...]) -> Value:
    """``x[arange(batch), picks]``: sample b's row ``picks[b]`` along axis 1 (the last-token pooling of
    GPT-2/Llama sequence classifiers) = gather_elements on axis 1 with ``picks`` broadcast over the rest."""
    batch, rest = x.shape[0], tuple(x.shape[2:])
    index = w.lw.reshape(f"{n.name}_pick", picks, (batch, 1, *[1] * len(rest)), w.origin(n))
    index = w.lw.expand(f"{n.name}_pick_expand", index, (batch, 1, *rest), w.origin(n))
    picked = w.lw.index_op(n.name, "gather_elements", [x, index], (batch, 1, *rest), w.origin(n), x.dtype, axis=1)
    return w.lw.reshape(f"{n.name}_squeeze", picked, shape, w.origin(n))


def lower_where(w: Any, n: Any, cond: Any, x: Any, y: Any, origin: str) -> Any:
    """``where(cond, x, y)`` with an index-data condition (a causal or padding mask, constant or
    computed from the inputs) and something computed at run time (a branch, or the condition: a
    mask turned additive): the interpreter's ``where`` (paths: the condition gates, both branches'
    paths add, as the ONNX frontend's Where). A condition computed from activations stays opaque."""
    runtime = [t for t in (cond, x, y) if isinstance(t, Value)]
    if not runtime or not (isinstance(cond, TorchConst) or _is_index(cond)):
        items = [t for t in (cond, x, y) if isinstance(t, (Value, TorchConst))]
        return w.lw.opaque(n.name, items, [w.shape(n)], origin, "where on activations (a condition computed from activations)")
    like = next((t for t in (x, y) if isinstance(t, Value)), None)
    x, y = (t if isinstance(t, (Value, TorchConst)) else w.lw.const(t, like) for t in (x, y))
    dtype = _out_dtype(w, n) or (like.dtype if like is not None else "float32")
    return w.lw.index_op(n.name, "where", [cond, x, y], w.shape(n), origin, dtype)


def _aten_compare(fn: str, bool_only: bool = False) -> Rule:
    return lambda w, n, a: lower_compare(w, n, fn, a["self"], a.get("other"), str(n.target), bool_only=bool_only)


def _fx_compare(fn: str, bool_only: bool = False) -> Rule:
    return lambda w, n, x, other=None, *rest, **kw: lower_compare(w, n, fn, x, kw.get("other", other), n.name, bool_only=bool_only)


ATEN_INDEX_RULES: dict[str, Rule] = {
    **{name: _aten_compare(fn) for name, fn in COMPARE_NAMES.items()},
    **{name: _aten_compare(fn, bool_only=True) for name, fn in BITWISE_NAMES.items()},
    "cumsum": lambda w, n, a: _cumsum(w, n, a["self"], a["dim"], str(n.target)),
    "gather": lambda w, n, a: _gather(w, n, a["self"], a["dim"], a["index"], str(n.target)),
    "argmax": lambda w, n, a: _arg_reduce(w, n, "max", a["self"], a.get("dim"), a.get("keepdim", False), str(n.target)),
    "argmin": lambda w, n, a: _arg_reduce(w, n, "min", a["self"], a.get("dim"), a.get("keepdim", False), str(n.target)),
}

def _fx_arg_reduce(fn: str) -> Rule:
    return lambda w, n, x, dim=None, keepdim=False: _arg_reduce(w, n, fn, x, dim, keepdim, n.name)


#: fx rules keyed both as the torch function and as the Tensor method
_FX_FUNCTION_AND_METHOD: dict[str, Rule] = {
    "cumsum": lambda w, n, x, dim, *rest, **kw: _cumsum(w, n, x, dim, n.name),
    "gather": lambda w, n, x, dim, index, *rest, **kw: _gather(w, n, x, dim, index, n.name),
    "masked_fill": lambda w, n, x, mask, value, *rest, **kw: lower_where(w, n, mask, value, x, n.name),
    "argmax": _fx_arg_reduce("max"), "argmin": _fx_arg_reduce("min"),
}

FX_INDEX_RULES: dict[Any, Rule] = {
    operator.eq: _fx_compare("eq"), operator.ne: _fx_compare("ne"), operator.lt: _fx_compare("lt"), operator.le: _fx_compare("le"),
    operator.gt: _fx_compare("gt"), operator.ge: _fx_compare("ge"), operator.invert: _fx_compare("not", bool_only=True),
    operator.and_: _fx_compare("and", bool_only=True), operator.or_: _fx_compare("or", bool_only=True), operator.xor: _fx_compare("xor", bool_only=True),
    **{getattr(torch, name): rule for name, rule in _FX_FUNCTION_AND_METHOD.items()},
    **{f"Tensor.{name}": rule for name, rule in _FX_FUNCTION_AND_METHOD.items()},
}
for _names, _bool_only in ((COMPARE_NAMES, False), (BITWISE_NAMES, True)):
    for _name, _fn in _names.items():
        if not _name.startswith("_"):
            FX_INDEX_RULES[f"Tensor.{_name}"] = _fx_compare(_fn, _bool_only)
            if hasattr(torch, _name):
                FX_INDEX_RULES[getattr(torch, _name)] = _fx_compare(_fn, _bool_only)
