"""The interpreter's dense per-OpKind rule bodies: ``rule(it, node, args) -> outputs`` in torch.

Pointwise ops (``BINARY_FN`` / ``UNARY_FN``), norms, pooling, constants, concat operands,
split, adds and products of two activations, with the model's own semantics. A rule sees the
interpreter only through :class:`RuleContext`, so this module needs nothing from it. The other
bodies: :mod:`pai_compiler.interp_index_rules` (shape and index ops), :mod:`pai_compiler.interp_path_rules`
(the ``paths`` overrides and attention); the tables in :mod:`pai_compiler.interp_tables`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from pai_compiler.errors import PaicError
from pai_compiler.ir import Node, OpKind, Param

__all__ = [
    "RuleContext", "BINARY_FN", "UNARY_FN", "pad_spatial", "real_pointwise", "real_norm", "pool", "broadcast_operands",
    "constant", "split", "real_mul", "add",
]


class RuleContext(Protocol):
    """What a rule reads of the interpreter: its options and its weight, constant and dim lookups."""

    dtype: torch.dtype
    device: str | torch.device
    pool: Literal["sum", "model"]
    scaling: Literal["none", "exact", "dpai"]
    lookup: Literal["table", "ones"]
    distinct_rows: bool

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
