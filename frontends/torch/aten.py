"""ATen op rules of the torch.export frontend: ``rule(walker, node, bound-arguments)`` -> IR values.

``ATEN_RULES`` maps an ATen overload packet (``conv2d``, ``linear``, ``scaled_dot_product_attention``,
``index``...) to a rule; ``walker`` is the export walker (``walker.lw`` the shared
``TorchLowering``, ``walker.shape(node)``/``walker.origin(node)`` the node's symbolic shape and
module path). Runtime checks (``_assert_tensor_metadata``) lower to nothing, eval-mode dropout
to its input; the safe-softmax guard of core ATen folds away.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sympy
import torch

from pai_compiler.frontends.torch.assign import ATEN_ASSIGN_RULES
from pai_compiler.frontends.torch.index_ops import ATEN_INDEX_RULES, COMPARE_NAMES, lower_compare, lower_index, lower_where
from pai_compiler.frontends.torch.operands import TorchConst, cast_const, dtype_name, perm_of
from pai_compiler.ir import Value

__all__ = ["ATEN_RULES", "Rule", "SafeSoftmaxGuard", "Zeros"]

Rule = Callable[..., Any]


# ---- ATen rules: rule(walker, node, bound-arguments) ---------------------------------------
def _const_or_none(x: Any) -> TorchConst | None:
    return x if isinstance(x, TorchConst) else None


def _conv(w: Any, n: Any, a: dict[str, Any]) -> Any:
    if not isinstance(a["weight"], TorchConst) or isinstance(a["bias"], Value):
        return w.lw.opaque(n.name, [a["input"], a["weight"]], [w.shape(n)], str(n.target), "convolution with an activation weight")
    if a.get("transposed") or "conv_transpose" in str(n.target):  # aten.convolution(transposed=True), aten.conv_transpose{1,2,3}d
        return w.lw.conv_transpose(n.name, a["input"], a["weight"], _const_or_none(a["bias"]), a["stride"], a["padding"], a.get("output_padding", 0),
                                   a["dilation"], a["groups"], w.shape(n), w.origin(n))
    return w.lw.conv(n.name, a["input"], a["weight"], _const_or_none(a["bias"]), a["stride"], a["padding"], a["dilation"], a["groups"], w.shape(n), w.origin(n))


def _linear(w: Any, n: Any, a: dict[str, Any]) -> Any:
    if not isinstance(a["weight"], TorchConst) or isinstance(a["bias"], Value):
        return w.lw.opaque(n.name, [a["input"], a["weight"]], [w.shape(n)], "linear", "linear with an activation weight")
    return w.lw.linear(n.name, a["input"], a["weight"], _const_or_none(a["bias"]), w.shape(n), w.origin(n))


def _embedding(w: Any, n: Any, a: dict[str, Any]) -> Any:
    """``aten.embedding(weight, indices)``: the table's rows picked by the indices."""
    table, idx = a["weight"], a["indices"]
    if not isinstance(table, TorchConst) or table.broadcast_to is not None or not isinstance(idx, Value):
        return w.lw.opaque(n.name, [t for t in (table, idx) if isinstance(t, (Value, TorchConst))], [w.shape(n)], str(n.target), "embedding of an activation table")
    return w.lw.embedding(n.name, idx, table, w.shape(n), w.origin(n), "embedding")


def _addmm(w: Any, n: Any, a: dict[str, Any]) -> Any:
    """``beta*self + alpha*(mat1 @ mat2)`` with a constant mat2 (a transposed weight) = linear."""
    x, weight, bias = a["mat1"], a["mat2"], a.get("self")
    if not isinstance(x, Value) or not isinstance(weight, TorchConst) or isinstance(bias, Value) or a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
        return w.lw.opaque(n.name, [t for t in (bias, x, weight) if t is not None], [w.shape(n)], str(n.target), "addmm that is not a linear layer")
    return w.lw.linear(n.name, x, weight, _const_or_none(bias), w.shape(n), w.origin(n), transposed=True)


def _matmul(w: Any, n: Any, a: dict[str, Any]) -> Any:
    first, second = a.get("self"), a.get("mat2", a.get("other"))
    return w.lw.matmul(n.name, first, second, w.shape(n), w.origin(n))


def _baddbmm(w: Any, n: Any, a: dict[str, Any]) -> Any:
    return w.lw.baddbmm(n.name, a.get("self"), a["batch1"], a["batch2"], w.shape(n), w.origin(n), alpha=a.get("alpha", 1), beta=a.get("beta", 1))


def _batch_norm(w: Any, n: Any, a: dict[str, Any]) -> Any:
    if a.get("training") or not isinstance(a["running_mean"], TorchConst):
        return w.lw.opaque(n.name, [a["input"]], [w.shape(n)], str(n.target), "batch norm in training mode")
    consts = {"scale": a["weight"], "bias": a["bias"], "mean": a["running_mean"], "var": a["running_var"]}
    out = w.lw.norm(n.name, a["input"], "batch", consts, a["eps"], w.origin(n))
    return out if "legit" not in str(n.target) else (out, None, None)


def _layer_norm(w: Any, n: Any, a: dict[str, Any]) -> Any:
    out = w.lw.norm(n.name, a["input"], "layer", {"scale": a["weight"], "bias": a["bias"]}, a["eps"], w.origin(n), axis=-len(a["normalized_shape"]))
    return (out, None, None) if "native" in str(n.target) else out


def _group_norm(w: Any, n: Any, a: dict[str, Any]) -> Any:
    groups = a.get("num_groups", a.get("group"))
    out = w.lw.norm(n.name, a["input"], "group", {"scale": a["weight"], "bias": a["bias"]}, a["eps"], w.origin(n), num_groups=int(groups))
    return (out, None, None) if "native" in str(n.target) else out


def _unary(op: str, **fixed: Any) -> Rule:
    return lambda w, n, a: w.lw.pointwise(n.name, a["self"], op, w.origin(n), **fixed)


def _alias(w: Any, n: Any, a: dict[str, Any]) -> Any:
    return a.get("self", a.get("input"))


def _nothing(w: Any, n: Any, a: dict[str, Any]) -> None:
    """A runtime check (``_assert_tensor_metadata``): no value, no semantics at compile time."""
    return None


def _dropout_pair(w: Any, n: Any, a: dict[str, Any]) -> Any:
    """``native_dropout`` in eval mode: the input and an unused mask."""
    return (a["input"], None)


def _logical_and(w: Any, n: Any, a: dict[str, Any]) -> Any:
    """``a & b`` on boolean masks; an all-true constant operand only broadcasts the other."""
    first, second = a["self"], a["other"]
    for x, other in ((first, second), (second, first)):
        if isinstance(x, Value) and isinstance(other, TorchConst) and bool(other.value.all()):
            return w.lw.expand(n.name, x, w.shape(n), w.origin(n))
    return w.lw.binary(n.name, "mul", first, second, w.shape(n), w.origin(n))


def _to_copy(w: Any, n: Any, a: dict[str, Any]) -> Any:
    x = a["self"]
    dtype = str(n.meta["val"].dtype).removeprefix("torch.")
    if isinstance(x, TorchConst):  # a constant expanded over the batch (or computed at it): cast, it stays a constant
        return cast_const(x, getattr(torch, dtype))
    return x if dtype == x.dtype else w.lw.pointwise(n.name, x, "cast", w.origin(n), to=dtype)


def _binary(op: str, swap: bool = False) -> Rule:
    def rule(w: Any, n: Any, a: dict[str, Any]) -> Any:
        if a.get("rounding_mode") is not None:
            return w.lw.opaque(n.name, [a["self"], a["other"]], [w.shape(n)], str(n.target), "integer division")
        x, other = a["self"], a.get("other", a.get("exponent"))
        alpha = a.get("alpha", 1)
        if alpha not in (None, 1):
            if isinstance(other, Value):
                other = w.lw.binary(f"{n.name}_alpha", "mul", other, float(alpha), other.shape, w.origin(n))
            else:
                other = TorchConst(w.lw.const(other).value * alpha)
        first, second = (other, x) if swap else (x, other)
        return w.lw.binary(n.name, op, first, second, w.shape(n), w.origin(n))
    return rule


def _reshape(w: Any, n: Any, a: dict[str, Any]) -> Any:
    return w.lw.reshape(n.name, a["self"], w.shape(n), w.origin(n))


def _permute(kind: str) -> Rule:
    def rule(w: Any, n: Any, a: dict[str, Any]) -> Any:
        x = a["self"]
        rest = [a[k] for k in ("dim0", "dim1", "dims") if a.get(k) is not None]
        return w.lw.transpose(n.name, x, perm_of(kind, len(x.shape), rest), w.origin(n))
    return rule


def _expand(w: Any, n: Any, a: dict[str, Any]) -> Any:
    return w.lw.expand(n.name, a["self"], w.shape(n), w.origin(n))


def _select(w: Any, n: Any, a: dict[str, Any]) -> Any:
    return w.lw.select(n.name, a["self"], a["dim"], a["index"], w.origin(n))


def _slice(w: Any, n: Any, a: dict[str, Any]) -> Any:
    x, step = a["self"], a.get("step") or 1
    if any(isinstance(v, sympy.Basic) for v in (a.get("start"), a.get("end"))):
        return w.lw.opaque(n.name, [x], [w.shape(n)], str(n.target), "slicing with a batch-dependent bound")
    return w.lw.slice(n.name, x, a["dim"], a.get("start"), a.get("end"), step, w.shape(n), w.origin(n))


def _cat(w: Any, n: Any, a: dict[str, Any]) -> Any:
    return w.lw.concat(n.name, list(a["tensors"]), a.get("dim") or 0, w.shape(n), w.origin(n))


def _stack(w: Any, n: Any, a: dict[str, Any]) -> Any:
    out = w.shape(n)
    dim = int(a.get("dim") or 0) % len(out)
    parts = []
    for i, t in enumerate(a["tensors"]):
        v = w.lw.value(t, f"{n.name}_{i}")
        parts.append(w.lw.reshape(f"{n.name}_unsqueeze", v, (*v.shape[:dim], 1, *v.shape[dim:]), w.origin(n)))
    return w.lw.concat(n.name, parts, dim, out, w.origin(n))


def _split(w: Any, n: Any, a: dict[str, Any]) -> Any:
    x = a["self"]
    shapes = w.meta_shape(n.meta["val"])
    unbind = "unbind" in str(n.target)
    axis = int(a.get("dim") or 0) % len(x.shape)
    parts_shapes = [(*s[:axis], 1, *s[axis:]) for s in shapes] if unbind else list(shapes)
    sizes = [s[axis] for s in parts_shapes]
    if not all(isinstance(s, int) for s in sizes):
        return w.lw.opaque(n.name, [x], list(shapes), str(n.target), "splitting a batch-sized axis")
    parts = w.lw.split(n.name, x, sizes, axis, parts_shapes, w.origin(n))
    if unbind:
        parts = [w.lw.reshape(f"{n.name}_squeeze", p, s, w.origin(n)) for p, s in zip(parts, shapes)]
    return tuple(parts)


def _pool(mode: str) -> Rule:
    def rule(w: Any, n: Any, a: dict[str, Any]) -> Any:
        x = a["self"]
        if a.get("divisor_override"):
            return w.lw.opaque(n.name, [x], [w.shape(n)], str(n.target), "average pooling with divisor_override")
        shape = w.meta_shape(n.meta["val"])
        out_shape = shape[0] if isinstance(shape, list) else shape
        out = w.lw.pool(n.name, x, mode, a["kernel_size"], a.get("stride"), a.get("padding") or 0, a.get("dilation") or 1,
                        bool(a.get("ceil_mode")), bool(a.get("count_include_pad", True)), out_shape, w.origin(n))
        return (out, None) if "with_indices" in str(n.target) else out
    return rule


def _adaptive(mode: str) -> Rule:
    def rule(w: Any, n: Any, a: dict[str, Any]) -> Any:
        return w.lw.adaptive_pool(n.name, a["self"], mode, a["output_size"], w.shape(n), w.origin(n))
    return rule


def _upsample(mode: str) -> Rule:
    """``aten.upsample_{nearest,linear,bilinear,trilinear}{1,2,3}d`` (``.vec``: ``scale_factors``; ``.default``: ``scales_*``)."""
    def rule(w: Any, n: Any, a: dict[str, Any]) -> Any:
        scales = a.get("scale_factors")
        if scales is None:
            per_axis = [a[k] for k in ("scales", "scales_d", "scales_h", "scales_w") if k in a]
            scales = per_axis if per_axis and all(s is not None for s in per_axis) else None
        x = a.get("input", a.get("self"))
        return w.lw.resize(n.name, x, mode, a.get("align_corners"), scales, False, w.shape(n), w.origin(n))
    return rule


def _reduce(mode: str) -> Rule:
    def rule(w: Any, n: Any, a: dict[str, Any]) -> Any:
        dim = a.get("dim")
        axes = None if dim is None else ([dim] if isinstance(dim, int) else list(dim))
        val = n.meta.get("val")
        return w.lw.reduce(n.name, a["self"], mode, axes, bool(a.get("keepdim")), w.shape(n), w.origin(n),
                           dtype=dtype_name(val) if isinstance(val, torch.Tensor) else None)
    return rule


def _vector_norm(w: Any, n: Any, a: dict[str, Any]) -> Any:
    """``linalg.vector_norm(x, 2, dim, keepdim)`` (F.normalize, ConvNeXt-v2's GRN): an L2 reduction."""
    if a.get("ord", 2) != 2 or a.get("dtype") is not None:
        return w.lw.opaque(n.name, [a["self"]], [w.shape(n)], str(n.target), f"vector norm of order {a.get('ord')}")
    return _reduce("l2")(w, n, a)


def _softmax(log: bool) -> Rule:
    return lambda w, n, a: w.lw.softmax(n.name, a["self"], a["dim"], w.origin(n), log=log)


def _sdpa(w: Any, n: Any, a: dict[str, Any]) -> Any:
    if a.get("enable_gqa"):
        return w.lw.opaque(n.name, [a["query"], a["key"], a["value"]], [w.shape(n)], str(n.target), "grouped-query attention")
    return w.lw.sdpa(n.name, a["query"], a["key"], a["value"], w.shape(n), w.origin(n), scale=a.get("scale"),
                     mask=a.get("attn_mask"), causal=bool(a.get("is_causal")))


def _pad(w: Any, n: Any, a: dict[str, Any]) -> Any:
    if a.get("mode", "constant") != "constant" or a.get("value") not in (None, 0, 0.0):
        return w.lw.opaque(n.name, [a["self"]], [w.shape(n)], str(n.target), "non-zero or non-constant padding")
    return w.lw.pad(n.name, a["self"], a["pad"], w.shape(n), w.origin(n))


def _sym_size(w: Any, n: Any, a: dict[str, Any]) -> Any:
    return a["self"].shape[a["dim"]]


def _clamp(w: Any, n: Any, a: dict[str, Any]) -> Any:
    lo, hi = a.get("min", a.get("min_val")), a.get("max", a.get("max_val"))
    if isinstance(lo, (Value, TorchConst)) or isinstance(hi, (Value, TorchConst)):
        return w.lw.opaque(n.name, [a["self"]], [w.shape(n)], str(n.target), "clamp with tensor bounds")
    return w.lw.pointwise(n.name, a["self"], "clip", w.origin(n), min=float("-inf") if lo is None else float(lo), max=float("inf") if hi is None else float(hi))


def _leaky_relu(w: Any, n: Any, a: dict[str, Any]) -> Any:
    return w.lw.pointwise(n.name, a["self"], "leakyrelu", w.origin(n), alpha=float(a["negative_slope"]))


def _elu(w: Any, n: Any, a: dict[str, Any]) -> Any:
    if a.get("scale", 1) != 1 or a.get("input_scale", 1) != 1:
        return w.lw.pointwise(n.name, a["self"], "selu", w.origin(n))
    return w.lw.pointwise(n.name, a["self"], "elu", w.origin(n), alpha=float(a["alpha"]))


def _softplus(w: Any, n: Any, a: dict[str, Any]) -> Any:
    if a.get("beta", 1) != 1 or a.get("threshold", 20) != 20:
        return w.lw.opaque(n.name, [a["self"]], [w.shape(n)], str(n.target), "softplus with non-default beta/threshold")
    return w.lw.pointwise(n.name, a["self"], "softplus", w.origin(n))


class SafeSoftmaxGuard:
    """Core ATen's "safe softmax" guard ``all(x == -inf)`` (and its negations)."""


class Zeros:
    """``full_like(x, 0)``: the fill value of the safe-softmax guard."""


def _guard(w: Any, n: Any, a: dict[str, Any]) -> Any:
    x = a["self"]
    if isinstance(x, SafeSoftmaxGuard) or (str(n.target).startswith("aten.eq") and a.get("other") == float("-inf")):
        return SafeSoftmaxGuard()
    fn = COMPARE_NAMES.get(str(n.target).split(".")[1] if str(n.target).count(".") >= 1 else "")
    if fn is not None and isinstance(x, Value):
        return lower_compare(w, n, fn, x, a.get("other"), str(n.target))  # index data: a mask or ``ids == pad``
    return w.lw.opaque(n.name, [x] if isinstance(x, Value) else [], [w.shape(n)], str(n.target), "boolean tensor op")


def _full_like(w: Any, n: Any, a: dict[str, Any]) -> Any:
    if a.get("fill_value") == 0:
        return Zeros()
    return w.lw.opaque(n.name, [], [w.shape(n)], str(n.target), "full_like of an activation")


def _where(w: Any, n: Any, a: dict[str, Any]) -> Any:
    """``where(all(x == -inf), 0, softmax(x))`` is ``softmax(x)`` for finite scores."""
    if isinstance(a.get("condition"), SafeSoftmaxGuard) and isinstance(a.get("self"), Zeros) and isinstance(a.get("other"), Value):
        return a["other"]
    return lower_where(w, n, a.get("condition"), a.get("self"), a.get("other"), str(n.target))


ATEN_RULES: dict[str, Rule] = {
    "eq": _guard, "logical_not": _guard, "any": _guard, "full_like": _full_like, "where": _where,
    "conv1d": _conv, "conv2d": _conv, "conv3d": _conv, "convolution": _conv,
    "conv_transpose1d": _conv, "conv_transpose2d": _conv, "conv_transpose3d": _conv,
    "linear": _linear, "addmm": _addmm, "embedding": _embedding, "mm": _matmul, "bmm": _matmul, "matmul": _matmul, "baddbmm": _baddbmm,
    "batch_norm": _batch_norm, "_native_batch_norm_legit_no_training": _batch_norm,
    "layer_norm": _layer_norm, "native_layer_norm": _layer_norm, "group_norm": _group_norm, "native_group_norm": _group_norm,
    "gelu": lambda w, n, a: w.lw.pointwise(n.name, a["self"], "gelu", w.origin(n), approximate=a.get("approximate", "none")),
    "hardtanh": _clamp, "clamp": _clamp, "clip": _clamp, "clamp_min": _clamp, "clamp_max": _clamp, "leaky_relu": _leaky_relu, "elu": _elu, "softplus": _softplus,
    "hardsigmoid": _unary("hardsigmoid", alpha=1.0 / 6.0, beta=0.5),
    "dropout": _alias, "dropout_": _alias, "feature_dropout": _alias, "alpha_dropout": _alias, "native_dropout": _dropout_pair,
    "_assert_tensor_metadata": _nothing, "_assert_scalar": _nothing, "_assert_async": _nothing, "clone": _alias, "contiguous": _alias, "alias": _alias, "detach": _alias, "lift_fresh_copy": _alias,
    "_to_copy": _to_copy, "to": _to_copy, "type_as": lambda w, n, a: _to_copy(w, n, {"self": a["self"]}), "index": lower_index, "__and__": _logical_and, "bitwise_and": _logical_and,
    "logical_and": _logical_and,
    "add": _binary("add"), "add_": _binary("add"), "sub": _binary("sub"), "rsub": _binary("sub", swap=True),
    "mul": _binary("mul"), "div": _binary("div"), "pow": _binary("pow"), "maximum": _binary("max"), "minimum": _binary("min"),
    "multiply": _binary("mul"), "subtract": _binary("sub"), "divide": _binary("div"), "true_divide": _binary("div"),  # aliases export keeps
    "view": _reshape, "reshape": _reshape, "_unsafe_view": _reshape, "flatten": _reshape, "unflatten": _reshape,
    "squeeze": _reshape, "unsqueeze": _reshape, "view_as": _reshape, "reshape_as": _reshape,
    "permute": _permute("permute"), "transpose": _permute("transpose"), "t": _permute("t"), "numpy_T": _permute("t"),
    "roll": lambda w, n, a: w.lw.roll(n.name, a["self"], a["shifts"], a.get("dims"), w.origin(n)),
    "expand": _expand, "expand_as": _expand, "stack": _stack, "relu6": _unary("clip", min=0.0, max=6.0), "select": _select, "slice": _slice, "cat": _cat, "concat": _cat,
    "split": _split, "split_with_sizes": _split, "chunk": _split, "unbind": _split,
    "max_pool1d": _pool("max"), "max_pool2d": _pool("max"), "max_pool3d": _pool("max"),
    "max_pool2d_with_indices": _pool("max"), "max_pool3d_with_indices": _pool("max"),
    "avg_pool1d": _pool("avg"), "avg_pool2d": _pool("avg"), "avg_pool3d": _pool("avg"),
    "adaptive_avg_pool1d": _adaptive("avg"), "adaptive_avg_pool2d": _adaptive("avg"), "_adaptive_avg_pool2d": _adaptive("avg"),
    "adaptive_avg_pool3d": _adaptive("avg"), "mean": _reduce("avg"), "sum": _reduce("sum"), "amax": _reduce("max"),
    "linalg_vector_norm": _vector_norm,
    "softmax": _softmax(False), "_softmax": _softmax(False), "log_softmax": _softmax(True), "_log_softmax": _softmax(True),
    "rsqrt": lambda w, n, a: w.lw.binary(n.name, "pow", a["self"], -0.5, w.shape(n), w.origin(n)),  # RMSNorm's 1/sqrt
    "scaled_dot_product_attention": _sdpa, "constant_pad_nd": _pad, "pad": _pad, "sym_size": _sym_size,
    "upsample_nearest1d": _upsample("nearest"), "upsample_nearest2d": _upsample("nearest"), "upsample_nearest3d": _upsample("nearest"),
    "upsample_linear1d": _upsample("linear"), "upsample_bilinear2d": _upsample("bilinear"), "upsample_trilinear3d": _upsample("trilinear"),
}
for _op in ("relu", "relu_", "sigmoid", "tanh", "silu", "silu_", "mish", "hardswish", "selu", "exp", "log", "sqrt", "neg",
            "abs", "erf", "sin", "cos", "reciprocal", "sign", "floor", "ceil", "round", "softsign"):
    ATEN_RULES.setdefault(_op, _unary(_op.rstrip("_")))
ATEN_RULES.update(ATEN_ASSIGN_RULES)
for _op, _rule in ATEN_INDEX_RULES.items():
    ATEN_RULES.setdefault(_op, _rule)  # eq and logical_not keep the safe-softmax guard, which falls back to them
