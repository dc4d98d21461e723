"""The interpreter's per-OpKind rule bodies: ``rule(it, node, args) -> outputs`` in torch.

Real semantics (the model's own function: pointwise ops, norms, pooling, reshapes, constants,
concat/split, adds and products, fused attention, embedding lookups) and the path-count
overrides of the ``paths`` mode (the *gate rule* for products, norms/activations as identity,
adds summing counts, an embedding lookup as a path source). The tables that pick a rule per
``OpKind`` live in :mod:`pai_compiler.interp`; a rule sees the interpreter only through
:class:`RuleContext`, so this module needs nothing from it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from pai_compiler.errors import PaicError
from pai_compiler.ir import Node, OpKind, Param
from pai_compiler.ir.shape_program import ShapeProgram, gather_elements

__all__ = [
    "RuleContext", "AttentionOutput", "BINARY_FN", "UNARY_FN", "pad_spatial", "pad_all_axes", "real_pointwise",
    "real_norm", "pool", "reshape", "broadcast_operands", "constant", "split", "real_mul", "add", "path_mul",
    "path_identity", "path_add", "attention", "lookup_shape", "embedding", "path_embedding", "COMPARE_FN", "compare", "cumsum",
    "gather_along", "gather_nd",
]


class RuleContext(Protocol):
    """What a rule reads of the interpreter: its options and its weight, constant and dim lookups."""

    dtype: torch.dtype
    device: str | torch.device
    pool: Literal["sum", "model"]
    scaling: Literal["none", "exact", "dpai"]
    lookup: Literal["table", "ones"]

    def weight(self, p: Param) -> torch.Tensor: ...

    def oi_weight(self, p: Param) -> torch.Tensor: ...

    def const(self, p: Param) -> torch.Tensor: ...

    def dims(self, shape: Any) -> list[int]: ...


def pad_spatial(x: torch.Tensor, pads: list[int], value: float = 0.0) -> torch.Tensor:
    n = len(pads) // 2
    if not any(pads):
        return x
    flat: list[int] = []
    for i in reversed(range(n)):
        flat += [pads[i], pads[i + n]]
    return F.pad(x, flat, value=value)



def real_pointwise(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    x = args[0]
    op = node.attrs["op"]
    if "const" in node.params and op in BINARY_FN:
        c = it.const(node.params["const"])
        a, b = (c, x) if node.attrs.get("const_first") else (x, c)
        return [BINARY_FN[op](a, b)]
    if op == "prelu":
        return [torch.where(x >= 0, x, x * it.const(node.params["const"]))]
    fn = UNARY_FN.get(op)
    if fn is None:
        raise PaicError(f"node {node.name!r}: pointwise op {op!r} has no torch rule")
    return [fn(x, node.attrs)]


BINARY_FN: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
    "max": torch.maximum, "min": torch.minimum,
}

UNARY_FN: dict[str, Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]] = {
    "relu": lambda x, a: F.relu(x),
    "leakyrelu": lambda x, a: F.leaky_relu(x, a.get("alpha", 0.01)),
    "sigmoid": lambda x, a: torch.sigmoid(x),
    "tanh": lambda x, a: torch.tanh(x),
    "gelu": lambda x, a: a.get("scale", 1.0) * F.gelu(x, approximate=a.get("approximate", "none")),
    "silu": lambda x, a: F.silu(x),
    "erf": lambda x, a: torch.erf(x),
    "elu": lambda x, a: F.elu(x, a.get("alpha", 1.0)),
    "selu": lambda x, a: F.selu(x),
    "celu": lambda x, a: F.celu(x, a.get("alpha", 1.0)),
    "softplus": lambda x, a: F.softplus(x),
    "softsign": lambda x, a: F.softsign(x),
    "hardsigmoid": lambda x, a: torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0, 1),
    "hardswish": lambda x, a: F.hardswish(x),
    "mish": lambda x, a: F.mish(x),
    "exp": lambda x, a: torch.exp(x),
    "log": lambda x, a: torch.log(x),
    "sqrt": lambda x, a: torch.sqrt(x),
    "neg": lambda x, a: -x,
    "abs": lambda x, a: torch.abs(x),
    "sign": lambda x, a: torch.sign(x),
    "reciprocal": lambda x, a: torch.reciprocal(x),
    "identity": lambda x, a: x,
    "cast": lambda x, a: x.to(getattr(torch, a["to"])) if a.get("to") not in ("float32", "float64", "float16", "bfloat16") else x,
    "sin": lambda x, a: torch.sin(x),
    "cos": lambda x, a: torch.cos(x),
    "floor": lambda x, a: torch.floor(x),
    "ceil": lambda x, a: torch.ceil(x),
    "round": lambda x, a: torch.round(x),
    "clip": lambda x, a: torch.clamp(x, a.get("min", -math.inf), a.get("max", math.inf)),
    "isnan": lambda x, a: torch.isnan(x),
    "nan_to_value": lambda x, a: torch.where(torch.isnan(x), torch.full_like(x, a.get("value", 0.0)), x),
    "thresholdedrelu": lambda x, a: torch.where(x > a.get("alpha", 1.0), x, torch.zeros_like(x)),
}


def real_norm(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    x = args[0]
    eps = node.attrs.get("epsilon", 0.0)
    p = node.params
    typ = node.attrs["type"]
    scale = it.const(p["scale"]) if "scale" in p else None
    bias = it.const(p["bias"]) if "bias" in p else None
    if typ == "batch":
        return [F.batch_norm(x, it.const(p["mean"]), it.const(p["var"]), scale, bias, False, 0.0, eps)]
    if typ == "layer":
        axis = node.attrs.get("axis", -1) % x.dim()
        shape = list(x.shape[axis:])
        w = scale.reshape(shape) if scale is not None and scale.numel() == math.prod(shape) else None
        b = bias.reshape(shape) if bias is not None and bias.numel() == math.prod(shape) else None
        y = F.layer_norm(x, shape, w, b, eps)
        if scale is not None and w is None:
            y = y * scale
        if bias is not None and b is None:
            y = y + bias
        return [y]
    if typ == "lrn":
        a = node.attrs
        return [F.local_response_norm(x, a["size"], a["alpha"], a["beta"], a["bias"])]
    if typ == "instance":
        return [F.instance_norm(x, weight=scale, bias=bias, eps=eps)]
    if typ == "group":
        g = node.attrs["num_groups"]
        y = F.group_norm(x, g, eps=eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        if scale is not None:
            y = y * (scale.repeat_interleave(x.shape[1] // scale.numel()).reshape(shape))
        if bias is not None:
            y = y + (bias.repeat_interleave(x.shape[1] // bias.numel()).reshape(shape))
        return [y]
    raise PaicError(f"node {node.name!r}: unknown norm type {typ!r}")


def pool(it: RuleContext, node: Node, args: list[torch.Tensor], *, as_sum: bool = False) -> list[torch.Tensor]:
    x = args[0]
    a = node.attrs
    mode = a["mode"]
    if as_sum:
        mode = "sum"
    if a.get("reduce"):
        axes = a["axes"]
        keep = a.get("keepdims", True)
        if mode == "max":
            return [torch.amax(x, dim=axes, keepdim=keep)]
        if mode == "sum":
            return [torch.sum(x, dim=axes, keepdim=keep)]
        if mode == "l2":  # ReduceL2 / linalg.vector_norm: a path count reduces as a sum (as_sum), a value as its norm
            return [torch.linalg.vector_norm(x, 2, dim=axes, keepdim=keep)]
        return [torch.mean(x, dim=axes, keepdim=keep)]
    k, s, pads, n = a["kernel_shape"], a["strides"], a["pads"], len(a["kernel_shape"])
    ceil = a.get("ceil_mode", False)
    dil = a.get("dilations", [1] * n)
    fns = {1: (F.max_pool1d, F.avg_pool1d), 2: (F.max_pool2d, F.avg_pool2d), 3: (F.max_pool3d, F.avg_pool3d)}[n]
    if mode == "max":
        return [fns[0](pad_spatial(x, pads, -math.inf), k, s, 0, dil, ceil_mode=ceil)]
    if any(d != 1 for d in dil):
        raise PaicError(f"node {node.name!r}: dilated average pooling is not supported")
    padded = pad_spatial(x, pads)
    summed = fns[1](padded, k, s, 0, ceil_mode=ceil) * math.prod(k)
    if mode == "sum":
        return [summed]
    if a.get("count_include_pad") or not any(pads):
        count = fns[1](pad_spatial(torch.ones_like(x[:1, :1]), pads, 1.0), k, s, 0, ceil_mode=ceil) * math.prod(k)
    else:
        count = fns[1](pad_spatial(torch.ones_like(x[:1, :1]), pads), k, s, 0, ceil_mode=ceil) * math.prod(k)
    return [summed / count]


def reshape(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    x = args[0]
    a = node.attrs
    op = a["op"]
    if op == "reshape":
        return [x.reshape(it.dims(node.outputs[0].shape))]
    if op == "transpose":
        return [x.permute(a["perm"])]
    if op == "gather":
        idx = torch.as_tensor(np.asarray(a["indices"], dtype=np.int64).reshape(a["indices_shape"]), device=x.device)
        idx = torch.where(idx < 0, idx + x.shape[a["axis"]], idx)
        flat = torch.index_select(x, a["axis"], idx.reshape(-1))
        return [flat.reshape(*x.shape[: a["axis"]], *idx.shape, *x.shape[a["axis"] + 1 :])]
    if op == "slice":
        index = [slice(None)] * x.dim()
        for st, en, ax, sp in zip(a["starts"], a["ends"], a["axes"], a["steps"]):
            if sp < 0:
                return [_neg_slice(x, a)]
            index[ax] = slice(*slice(st, en, sp).indices(x.shape[ax]))
        return [x[tuple(index)]]
    if op == "expand":
        return [x.expand(*it.dims(node.outputs[0].shape))]
    if op == "pad":
        return [pad_all_axes(x, a["pads"])]
    raise PaicError(f"node {node.name!r}: reshape op {op!r} has no torch rule")


def _neg_slice(x: torch.Tensor, a: dict[str, Any]) -> torch.Tensor:
    arr_idx = []
    for ax in range(x.dim()):
        arr_idx.append(torch.arange(x.shape[ax]))
    for st, en, ax, sp in zip(a["starts"], a["ends"], a["axes"], a["steps"]):
        arr_idx[ax] = torch.arange(x.shape[ax])[slice(*slice(st, en, sp).indices(x.shape[ax]))] if sp > 0 else torch.tensor(list(range(*slice(st, en, sp).indices(x.shape[ax]))), dtype=torch.long)
    for ax, idx in enumerate(arr_idx):
        x = torch.index_select(x, ax, idx.to(x.device))
    return x


def pad_all_axes(x: torch.Tensor, pads: list[int]) -> torch.Tensor:
    n = x.dim()
    flat: list[int] = []
    for i in reversed(range(n)):
        flat += [pads[i], pads[i + n]]
    return F.pad(x, flat)


def broadcast_operands(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    out_shape = node.outputs[0].shape
    if node.kind is OpKind.CONCAT:
        axis = node.attrs["axis"]
        full = it.dims(out_shape) if out_shape is not None else None
        res = []
        for t, v in zip(args, node.inputs):
            if full is not None and v.producer is not None and v.producer.kind is OpKind.CONSTANT:
                target = list(full)
                target[axis] = t.shape[axis] if t.dim() == len(full) else target[axis]
                t = t.expand(*target)
            res.append(t)
        return res
    return args


def constant(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    t = it.const(node.params["value"])
    if node.attrs.get("broadcast"):
        t = t.expand(*it.dims(node.outputs[0].shape))
    return [t]


def split(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.split(args[0], node.attrs["sizes"], dim=node.attrs["axis"]))


def real_mul(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    return [BINARY_FN[node.attrs.get("op", "mul")](args[0], args[1])]


def add(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    if node.attrs.get("op") == "sub":
        return [args[0] - args[1]]
    out = args[0]
    for t in args[1:]:
        out = out + t
    return [out]


# ---- path-count semantics (override the real ones) ---------------------------------------
def path_mul(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gate rule: a path through a product goes through one factor; the other is a unit gate."""
    a, b = args
    if node.kind is OpKind.MATMUL:
        return [torch.matmul(a, torch.ones_like(b)) + torch.matmul(torch.ones_like(a), b)]
    return [a + b]


def path_identity(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    shape = node.outputs[0].shape
    x = args[0]
    if shape is not None and list(x.shape) != it.dims(shape):
        x = x.expand(*it.dims(shape))
    return [x]


def path_add(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    out = args[0]
    for t in args[1:]:
        out = out + t  # a subtraction still routes paths: counts add
    return [out]


# ---- attention (torch frontends: one node per nn.MultiheadAttention) ----------------------
@dataclass(frozen=True)
class AttentionOutput:
    """A fused attention node's output, the input of its ``out_proj`` and its DPaI log scale."""

    output: torch.Tensor
    out_proj_input: torch.Tensor
    log_scale: torch.Tensor | None = None  # paths with scaling="dpai": Σ log max of the inputs it rescaled


def attention(it: RuleContext, node: Node, args: list[torch.Tensor], *, paths: bool = False) -> AttentionOutput:
    """Multi-head attention with inputs ``args[attrs["qkv"][i]]`` for query, key, value.

    Real: ``F.multi_head_attention_forward`` semantics in eval mode (no masks, no dropout):
    ``out_proj(softmax(q k^T / sqrt(d)) v)`` per head, with q/k/v the three row blocks of
    ``in_proj_weight`` (or ``q/k/v_proj_weight``) plus ``in_proj_bias``. Paths: the same
    dataflow with the masks as weights and no biases, the *gate rule* for both products
    (``paths(QK^T) = Q@1 + 1@K^T``, ``paths(AV) = A@1 + 1@V``), softmax and the 1/sqrt(d)
    scale as identity, exactly as the decomposed ONNX graph counts them. With
    ``scaling="dpai"`` the key/value inputs and the input of ``out_proj`` are divided by their
    max too (as they are for the separate linears of an ONNX graph): the logs are ``log_scale``.
    """
    a, p = node.attrs, node.params
    q_in, k_in, v_in = (args[i] for i in a.get("qkv", (0, 0, 0)))
    rescale = paths and it.scaling == "dpai"
    log_scale = torch.zeros((), dtype=it.dtype, device=it.device) if rescale else None
    if rescale:
        k_in, v_in, log_scale = _dpai_key_value(q_in, k_in, v_in, log_scale)
    unbatched = q_in.dim() == 2
    batch_first = a.get("batch_first", False)

    def to_nle(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(0) if unbatched else (t if batch_first else t.transpose(0, 1))

    o = _heads(it, node, to_nle(q_in), to_nle(k_in), to_nle(v_in), paths=paths)
    out_proj_input = o
    if log_scale is not None:
        m = o.max()
        if m > 0:
            o = o / m
            log_scale = log_scale + torch.log(m)
    bias = it.weight(p["out_proj_bias"]) if not paths and "out_proj_bias" in p else None
    out = F.linear(o, it.oi_weight(p["out_proj_weight"]), bias)
    out = out.squeeze(0) if unbatched else (out if batch_first else out.transpose(0, 1))
    return AttentionOutput(out, out_proj_input, log_scale)


def _dpai_key_value(q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor, log_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key and value inputs divided by their max (each distinct tensor once; the query is rescaled by the caller)."""
    seen = {id(q_in): q_in}
    for t in (k_in, v_in):
        if id(t) not in seen:
            m = t.max()
            if m > 0:
                seen[id(t)] = t / m
                log_scale = log_scale + torch.log(m)
            else:
                seen[id(t)] = t
    return seen[id(k_in)], seen[id(v_in)], log_scale


def _heads(it: RuleContext, node: Node, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor, *, paths: bool) -> torch.Tensor:
    """The per-head products on (N, L, E) inputs, concatenated back to (N, L_q, E): ``out_proj``'s input."""
    p = node.params
    if "in_proj_weight" in p:
        wq, wk, wv = it.oi_weight(p["in_proj_weight"]).chunk(3, 0)
    else:
        wq, wk, wv = (it.oi_weight(p[f"{x}_proj_weight"]) for x in "qkv")
    bq = bk = bv = None
    if not paths and "in_proj_bias" in p:
        bq, bk, bv = it.weight(p["in_proj_bias"]).chunk(3, 0)
    heads = int(node.attrs["num_heads"])
    n, lq, lk = q_in.shape[0], q_in.shape[1], k_in.shape[1]
    q = F.linear(q_in, wq, bq).reshape(n, lq, heads, -1).transpose(1, 2)
    k = F.linear(k_in, wk, bk).reshape(n, lk, heads, -1).transpose(1, 2)
    v = F.linear(v_in, wv, bv).reshape(n, lk, heads, -1).transpose(1, 2)
    if paths:
        kt = k.transpose(-2, -1)
        scores = torch.matmul(q, torch.ones_like(kt)) + torch.matmul(torch.ones_like(q), kt)
        o = torch.matmul(scores, torch.ones_like(v)) + torch.matmul(torch.ones_like(scores), v)
    else:  # explicit softmax (not F.scaled_dot_product_attention): GraSP needs a double backward
        scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-2, -1))
        o = torch.matmul(torch.softmax(scores, dim=-1), v)
    return o.transpose(1, 2).reshape(n, lq, -1)


# ---- opaque operators with a known meaning (attrs["op"]) -----------------------------------
def lookup_shape(node: Node, table: tuple[int, ...], indices: torch.Tensor) -> list[int]:
    axis = node.attrs.get("axis", 0) % len(table)
    return [*table[:axis], *indices.shape, *table[axis + 1 :]]


def embedding(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """``table`` gathered along ``axis`` by the integer indices ``args[0]`` (ONNX Gather: an
    index ``i < 0`` reads ``i + table.shape[axis]``; for axis 0 this is ``F.embedding``)."""
    p = node.params["table"]
    idx = args[0]
    if it.lookup == "ones" and not node.attrs.get("positional"):
        return [torch.ones(lookup_shape(node, p.shape, idx), dtype=it.dtype, device=it.device)]
    table = it.weight(p)
    axis = node.attrs.get("axis", 0) % table.dim()
    n = table.shape[axis]
    idx = idx.to(device=table.device, dtype=torch.int64)
    if idx.numel() and (bool((idx < -n).any()) or bool((idx >= n).any())):
        raise PaicError(f"node {node.name!r} (embedding): indices run {int(idx.min())}..{int(idx.max())}, the table has {n} entries on axis {axis}")
    idx = torch.where(idx < 0, idx + n, idx)
    flat = torch.index_select(table, axis, idx.reshape(-1))
    return [flat.reshape(lookup_shape(node, tuple(table.shape), idx))]


def path_embedding(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """A path source: one path starts at every output element (the indices carry none). A
    ``positional`` lookup (indices computed from sizes: positions, relative buckets) is a
    constant of the model, which carries no paths, exactly as a static export folds it."""
    fill = torch.zeros if node.attrs.get("positional") else torch.ones
    return [fill(lookup_shape(node, node.params["table"].shape, args[0]), dtype=it.dtype, device=it.device)]


def where(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """ONNX Where: ``args[1]`` where the condition ``args[0]`` holds, else ``args[2]`` (broadcast)."""
    cond, a, b = args
    return [torch.where(cond.to(torch.bool), a, b.to(a.dtype) if a.is_floating_point() else b)]


def path_where(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """A select routes the paths of either branch (the condition is a gate): counts add, broadcast."""
    out = torch.zeros(it.dims(node.outputs[0].shape), dtype=it.dtype, device=it.device)
    return [out + args[1].to(it.dtype) + args[2].to(it.dtype)]


def path_shape_data(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """A float tensor computed from sizes (a mask) is a data constant: zeros, no paths. Integer
    and bool ones are positions and indices, which gathers read: their real values."""
    value = shape_data(it, node, args)[0]
    return [torch.zeros_like(value, dtype=it.dtype)] if value.is_floating_point() else [value]


def dynamic_gather(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """ONNX Gather of an activation by run-time integer indices (negative ones count from the end);
    paths move exactly as values do."""
    data, idx = args
    axis = node.attrs.get("axis", 0) % data.dim()
    idx = idx.to(device=data.device, dtype=torch.int64)
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    flat = torch.index_select(data, axis, idx.reshape(-1))
    return [flat.reshape(*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :])]


#: ``op="compare"`` functions: a bool of one operand (``not``), of two (broadcast), or of one and ``attrs["scalar"]``
COMPARE_FN: dict[str, Callable[[torch.Tensor, Any], torch.Tensor]] = {
    "eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge,
    "and": lambda a, b: torch.logical_and(a, b), "or": lambda a, b: torch.logical_or(a, b),
    "xor": lambda a, b: torch.logical_xor(a, b), "not": lambda a, b: torch.logical_not(a),
}


def compare(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """Index data: ``fn(args[0], args[1] or attrs["scalar"])`` as a bool tensor (``ne(input_ids, pad)``, mask ``and``)."""
    fn = node.attrs["fn"]
    if fn not in COMPARE_FN:
        raise PaicError(f"node {node.name!r}: comparison {fn!r} has no torch rule (known: {', '.join(COMPARE_FN)})")
    other = args[1] if len(args) > 1 else node.attrs.get("scalar")
    return [COMPARE_FN[fn](args[0], other)]


def cumsum(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """Index data: the running sum along ``axis`` (``exclusive``/``reverse`` as ONNX CumSum); a bool
    input counts as int64, as torch's does."""
    x = args[0].long() if args[0].dtype == torch.bool else args[0]
    axis = int(node.attrs.get("axis", 0)) % max(x.dim(), 1)
    if node.attrs.get("reverse"):
        x = x.flip(axis)
    out = torch.cumsum(x, axis)
    if node.attrs.get("exclusive"):
        out = out - x
    target = getattr(torch, node.outputs[0].dtype, None) if node.outputs else None
    out = out.to(target) if isinstance(target, torch.dtype) and not target.is_floating_point else out  # torch widens, ONNX keeps
    return [out.flip(axis) if node.attrs.get("reverse") else out]


def gather_along(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """``torch.gather(data, axis, indices)`` (ONNX GatherElements): ``out[i][j] = data[i][indices[i][j]]`` on axis 1."""
    data, idx = args
    axis = int(node.attrs.get("axis", 0)) % data.dim()
    idx = idx.to(device=data.device, dtype=torch.int64)
    return [torch.gather(data, axis, torch.where(idx < 0, idx + data.shape[axis], idx))]


def gather_nd(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """ONNX GatherND on index data (see :func:`pai_compiler.ir.shape_program.gather_nd`)."""
    data, idx = args
    batch_dims, depth = int(node.attrs.get("batch_dims", 0)), idx.shape[-1]
    batch = math.prod(data.shape[:batch_dims])
    rows = idx.to(device=data.device, dtype=torch.int64).reshape(batch, -1, depth)
    rows = torch.where(rows < 0, rows + torch.tensor(data.shape[batch_dims:batch_dims + depth], device=data.device), rows)
    flat = data.reshape(batch, *data.shape[batch_dims:])
    picked = flat[(torch.arange(batch, device=data.device)[:, None], *rows.unbind(-1))]
    return [picked.reshape(*idx.shape[:-1], *data.shape[batch_dims + depth:])]


def shape_data(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run the node's :class:`ShapeProgram` at the bound sizes (positions, masks, buckets)."""
    program: ShapeProgram = node.attrs["program"]
    feeds = tuple((name, tuple(int(v) for v in it.dims(entries))) for name, _, entries in program.feeds)
    shapes = tuple(shape for _, shape, _ in program.feeds)
    value = _run_program(program.model, feeds, shapes)
    t = torch.as_tensor(value.copy(), device=it.device)
    return [t.to(it.dtype) if t.is_floating_point() else t]


@lru_cache(maxsize=256)
def _run_program(model: bytes, feeds: tuple[tuple[str, tuple[int, ...]], ...], shapes: tuple[tuple[int, ...], ...]) -> np.ndarray:
    import onnx  # heavy: only models with shape-dependent data get here
    from onnx.reference import ReferenceEvaluator

    inputs = {name: np.array(values, dtype=np.int64).reshape(shape) for (name, values), shape in zip(feeds, shapes)}
    evaluator = ReferenceEvaluator(onnx.load_from_string(model), new_ops=[_gather_elements_op()])
    with np.errstate(all="ignore"):  # log(0) = -inf in T5's relative buckets is the intended value, as in onnxruntime
        return np.asarray(evaluator.run(None, inputs)[0])


@lru_cache(maxsize=1)
def _gather_elements_op() -> type:
    from onnx.reference.op_run import OpRun  # heavy: see _run_program

    class GatherElements(OpRun):  # onnx's reference rejects indices smaller than the data on other axes
        op_domain = ""

        def _run(self, data: np.ndarray, indices: np.ndarray, axis: int = 0) -> tuple[np.ndarray]:  # type: ignore[override]
            return (gather_elements(data, indices, axis),)

    return GatherElements
