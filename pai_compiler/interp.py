"""Torch interpreter of the IR, in two semantics selected by ``mode``.

* ``real``: the model's own function (masked weights ``W * M``), the torch reference for
  ONNX Runtime equivalence and the forward of data-driven criteria (SNIP, GraSP, SynFlow).
* ``paths``: the ones-forward that counts input->output paths through binary masks: conv /
  linear / matmul with the mask as weight and no bias, norms, activations, softmax and
  constants-as-bias as identity, data constants as zero (they carry no path), pooling as a
  **sum** (``pool="sum"``) or as the model's own mean/max (``pool="model"``), residual adds
  summing. A product of two activations (``matmul`` such as attention's Q.K^T and A.V, or an
  elementwise ``mul``/``div``) follows the *gate rule*: a path goes through one factor while
  the other acts as a unit gate, so ``paths(A@B) = paths(A)@1 + 1@paths(B)`` and
  ``paths(a*b) = paths(a) + paths(b)``. Every attention weight (query, key, value, output)
  thus carries paths, and a class token (a constant) receives paths through its keys.

Opaque nodes are evaluated only when ``attrs["op"]`` names a rule in ``OPAQUE_RULES`` (see
:func:`rule_for`); every other opaque node stops the interpreter with a ``PaicError``. The one
such op is the **embedding lookup** (``op="embedding"``: the rows of a constant, non-prunable
``table`` Param picked along ``axis`` by a dynamic integer input, ONNX ``Gather`` semantics,
negative indices included). In ``real`` mode it is the lookup (``lookup="ones"`` makes it
output ones instead: SynFlow's all-ones input); in ``paths`` mode its output is a *path
source*, exactly like a float graph input of the output's shape: all ones whatever the
indices, and nothing flows back into the indices or the table.

``scaling`` keeps large counts finite: ``"exact"`` stores each value as ``t * exp(s)`` with
``t`` renormalised to max 1 after every node (scale detached, so gradients of the log count
are exact); ``"dpai"`` divides every weighted layer's input by its (non-detached) max and
adds ``sum(log max)`` back, as the DPaI reference code does (skip-weighted on residual nets).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import sympy
import torch
import torch.nn.functional as F

from pai_compiler.errors import PaicError
from pai_compiler.ir import Graph, Node, OpKind, Param, Value

__all__ = ["Interpreter", "conv_forward", "param_tensor", "torch_ready", "is_float_array", "rule_for", "indexes_lookups_only", "OPAQUE_RULES", "Rule"]

Mode = Literal["real", "paths"]


def torch_ready(data: Any) -> np.ndarray:
    """``data`` as an array torch can take: ml_dtypes floats (bfloat16, float8_*: numpy kind
    ``V``, which torch rejects) become float32, and read-only views are copied."""
    data = np.asarray(data)
    if data.dtype.kind == "V":
        return data.astype(np.float32)
    return data if data.flags.writeable else data.copy()


def is_float_array(data: Any) -> bool:
    """True for numpy floats and ml_dtypes' low-precision floats."""
    return np.asarray(data).dtype.kind in "fV"


def param_tensor(p: Param, dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    return torch.as_tensor(torch_ready(p.data), device=device).to(dtype)


class Interpreter:
    """Evaluate a Graph with torch. ``weights`` overrides prunable weights by param name."""

    def __init__(
        self,
        graph: Graph,
        *,
        mode: Mode = "real",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        weights: Mapping[str, torch.Tensor] | None = None,
        pool: Literal["sum", "model"] = "sum",
        scaling: Literal["none", "exact", "dpai"] = "none",
        bind: Mapping[str, int] | None = None,
        lookup: Literal["table", "ones"] = "table",
    ) -> None:
        self.graph = graph
        self.mode = mode
        self.dtype = dtype
        self.device = device
        self.weights = dict(weights or {})
        self.pool = pool
        self.scaling = scaling
        self.user_bind = dict(bind or {})
        self.bind = dict(self.user_bind)
        self.lookup = lookup  # real mode: "ones" makes every embedding lookup a path source
        self._const_cache: dict[int, torch.Tensor] = {}
        self.log_scale: torch.Tensor | float = 0.0  # of the last output (scaling != none)
        self.values: dict[str, torch.Tensor] = {}

    # ---- parameters --------------------------------------------------------------------
    def weight(self, p: Param) -> torch.Tensor:
        """The operand for a weight: override, else mask (paths) or masked data (real)."""
        if p.name in self.weights:
            return self.weights[p.name]
        if self.mode == "paths":  # cheap to rebuild; caching would hold a float copy of every weight
            if p.prunable and p.mask is not None:
                return torch.as_tensor(p.mask, device=self.device).to(self.dtype)
            return torch.ones(p.shape, dtype=self.dtype, device=self.device)
        key = id(p)
        if key not in self._const_cache:
            t = param_tensor(p, self.dtype if is_float_array(p.data) else torch.int64, self.device)
            if p.mask is not None:
                t = t * torch.as_tensor(p.mask, device=self.device).to(t.dtype)
            self._const_cache[key] = t
        return self._const_cache[key]

    def oi_weight(self, p: Param) -> torch.Tensor:
        """Weight with axes (out, in, rest...), as conv and linear expect."""
        w = self.weight(p)
        axes = [p.out_axis] + ([p.in_axis] if p.in_axis is not None else [])
        rest = [a for a in range(w.dim()) if a not in axes]
        order = axes + rest
        return w if order == list(range(w.dim())) else w.permute(order)

    def const(self, p: Param) -> torch.Tensor:
        key = id(p)
        if key not in self._const_cache:
            dt = self.dtype if is_float_array(p.data) else None
            t = param_tensor(p, dt or torch.int64, self.device) if dt else torch.as_tensor(np.asarray(p.data).copy(), device=self.device)
            self._const_cache[key] = t
        return self._const_cache[key]

    def dims(self, shape: Any) -> list[int]:
        out = []
        for d in shape:
            if isinstance(d, int):
                out.append(d)
            else:
                value = sympy.sympify(d).subs({sympy.Symbol(k, integer=True, positive=True): v for k, v in self.bind.items()})
                if not value.is_Integer:
                    raise PaicError(f"dimension {d} is not bound; pass --bind {d}=N")
                out.append(int(value))
        return out

    # ---- running -----------------------------------------------------------------------
    def _bind_inputs(self, inputs: list[torch.Tensor]) -> None:
        """Bind symbolic input dims to this run's sizes (user bindings for other symbols stay)."""
        self.bind = dict(self.user_bind)
        for v, t in zip(self.graph.inputs, inputs):
            if v.shape is None:
                continue
            for d, size in zip(v.shape, t.shape):
                if not isinstance(d, int) and isinstance(d, sympy.Symbol):
                    self.bind.setdefault(d.name, int(size))

    def run(
        self,
        inputs: list[torch.Tensor],
        *,
        on_node: Callable[[Node, list[torch.Tensor]], None] | None = None,
        keep_values: bool = True,
    ) -> list[torch.Tensor]:
        """Evaluate the graph; ``keep_values=False`` frees each value after its last use
        (``self.values`` then holds only what was never consumed)."""
        graph_inputs = self.graph.inputs
        if len(inputs) != len(graph_inputs):
            raise PaicError(f"model has {len(graph_inputs)} inputs, got {len(inputs)}")
        self._bind_inputs(inputs)
        env: dict[str, torch.Tensor] = {}
        scale: dict[str, Any] = {}
        dpai_log = torch.zeros((), dtype=self.dtype, device=self.device)
        outputs: list[torch.Tensor] = []
        out_scales: list[Any] = []
        feed = dict(zip([v.name for v in graph_inputs], inputs))
        dies_after = {} if keep_values else _last_uses(self.graph.nodes)
        for index, node in enumerate(self.graph.nodes):
            if node.kind is OpKind.INPUT:
                t = feed[node.outputs[0].name].to(self.device)
                env[node.outputs[0].name] = t.to(self.dtype) if t.is_floating_point() else t
                scale[node.outputs[0].name] = 0.0
                continue
            if node.kind is OpKind.OUTPUT:
                outputs.append(env[node.inputs[0].name])
                out_scales.append(scale.get(node.inputs[0].name, 0.0))
                continue
            args = [env[v.name] for v in node.inputs]
            node_scale: Any = 0.0
            if self.scaling == "exact" and args:
                args, node_scale = self._align(node, args, [scale[v.name] for v in node.inputs])
            if self.scaling == "dpai" and node.kind in (OpKind.CONV, OpKind.LINEAR, OpKind.ATTENTION):
                m = args[0].max()
                if m > 0:
                    args = [args[0] / m, *args[1:]]
                    dpai_log = dpai_log + torch.log(m)
            rule = rule_for(node, self.mode)
            if rule is None:
                raise PaicError(f"node {node.name!r} ({node.kind.value}{'/' + node.attrs.get('op_type', '') if node.kind is OpKind.OPAQUE else ''}): cannot be evaluated ({self.mode} mode)")
            try:
                outs = rule(self, node, args)
            except PaicError:
                raise
            except (RuntimeError, NotImplementedError, ValueError, TypeError, IndexError) as exc:
                detail = " ".join(str(exc).split())[:200]
                raise PaicError(f"node {node.name!r} ({node.kind.value}): cannot be evaluated in torch ({self.mode} mode): {detail}") from exc
            if "rule_log_scale" in self.__dict__:  # a rule that rescales inside a node (attention, dpai)
                dpai_log = dpai_log + self.__dict__.pop("rule_log_scale")
            for v, t in zip(node.outputs, outs):
                if self.scaling == "exact" and t.is_floating_point():
                    m = t.detach().abs().max() if t.numel() else torch.zeros(())
                    if m > 0:
                        t = t / m
                        scale[v.name] = node_scale + torch.log(m)
                    else:
                        scale[v.name] = node_scale
                else:
                    scale[v.name] = node_scale
                env[v.name] = t
            if on_node is not None:
                on_node(node, outs)
            for name in dies_after.get(index, ()):
                env.pop(name, None)
                scale.pop(name, None)
        self.values = env
        if self.scaling == "exact":
            self.out_log_scales = out_scales
        if self.scaling == "dpai":
            self.log_scale = dpai_log
        return outputs

    def _align(self, node: Node, args: list[torch.Tensor], scales: list[Any]) -> tuple[list[torch.Tensor], Any]:
        if len(args) == 1:
            return args, scales[0]
        ref = max(scales, key=lambda s: float(s))
        aligned = [a if float(s) == float(ref) else a * torch.exp(torch.as_tensor(s - ref, dtype=a.dtype)) for a, s in zip(args, scales)]
        return aligned, ref


def _last_uses(nodes: list[Node]) -> dict[int, list[str]]:
    """Node index -> names of the values whose last reader (or producer, if unread) it is."""
    last: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for v in node.outputs:
            last.setdefault(v.name, index)
        for v in node.inputs:
            last[v.name] = index
    dies: dict[int, list[str]] = {}
    for name, index in last.items():
        dies.setdefault(index, []).append(name)
    return dies


# ---- rules: real semantics (also used in paths mode unless overridden) --------------------
def _pad_spatial(x: torch.Tensor, pads: list[int], value: float = 0.0) -> torch.Tensor:
    n = len(pads) // 2
    if not any(pads):
        return x
    flat: list[int] = []
    for i in reversed(range(n)):
        flat += [pads[i], pads[i + n]]
    return F.pad(x, flat, value=value)


def conv_forward(it: Interpreter, node: Node, args: list[torch.Tensor], *, bias: bool = True) -> list[torch.Tensor]:
    """A conv node's real output on ``args[0]`` (masked weights; ``bias=False`` leaves the bias out)."""
    x = _pad_spatial(args[0], node.attrs["pads"])
    w = it.oi_weight(node.params["weight"])
    b = it.weight(node.params["bias"]) if bias and "bias" in node.params else None
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(w.dim() - 2)
    if conv is None:
        raise PaicError(f"conv {node.name!r}: {w.dim() - 2}-d convolution is not supported")
    return [conv(x, w, b, stride=node.attrs["strides"], dilation=node.attrs["dilations"], groups=node.attrs["groups"])]


def _linear(it: Interpreter, node: Node, args: list[torch.Tensor], *, bias: bool = True) -> list[torch.Tensor]:
    w = it.oi_weight(node.params["weight"])
    y = F.linear(args[0], w)
    if node.attrs.get("alpha", 1.0) != 1.0 and bias:
        y = y * node.attrs["alpha"]
    if bias and "bias" in node.params:
        y = y + node.attrs.get("beta", 1.0) * it.weight(node.params["bias"])
    return [y]


def _pointwise_real(it: Interpreter, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    x = args[0]
    op = node.attrs["op"]
    if "const" in node.params and op in _BINARY_FN:
        c = it.const(node.params["const"])
        a, b = (c, x) if node.attrs.get("const_first") else (x, c)
        return [_BINARY_FN[op](a, b)]
    if op == "prelu":
        return [torch.where(x >= 0, x, x * it.const(node.params["const"]))]
    fn = _UNARY_FN.get(op)
    if fn is None:
        raise PaicError(f"node {node.name!r}: pointwise op {op!r} has no torch rule")
    return [fn(x, node.attrs)]


_BINARY_FN: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
    "max": torch.maximum, "min": torch.minimum,
}

_UNARY_FN: dict[str, Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]] = {
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
    "thresholdedrelu": lambda x, a: torch.where(x > a.get("alpha", 1.0), x, torch.zeros_like(x)),
}


def _norm_real(it: Interpreter, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
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


def _pool(it: Interpreter, node: Node, args: list[torch.Tensor], *, as_sum: bool = False) -> list[torch.Tensor]:
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
        return [torch.mean(x, dim=axes, keepdim=keep)]
    k, s, pads, n = a["kernel_shape"], a["strides"], a["pads"], len(a["kernel_shape"])
    ceil = a.get("ceil_mode", False)
    dil = a.get("dilations", [1] * n)
    fns = {1: (F.max_pool1d, F.avg_pool1d), 2: (F.max_pool2d, F.avg_pool2d), 3: (F.max_pool3d, F.avg_pool3d)}[n]
    if mode == "max":
        return [fns[0](_pad_spatial(x, pads, -math.inf), k, s, 0, dil, ceil_mode=ceil)]
    if any(d != 1 for d in dil):
        raise PaicError(f"node {node.name!r}: dilated average pooling is not supported")
    padded = _pad_spatial(x, pads)
    summed = fns[1](padded, k, s, 0, ceil_mode=ceil) * math.prod(k)
    if mode == "sum":
        return [summed]
    if a.get("count_include_pad") or not any(pads):
        count = fns[1](_pad_spatial(torch.ones_like(x[:1, :1]), pads, 1.0), k, s, 0, ceil_mode=ceil) * math.prod(k)
    else:
        count = fns[1](_pad_spatial(torch.ones_like(x[:1, :1]), pads), k, s, 0, ceil_mode=ceil) * math.prod(k)
    return [summed / count]


def _reshape(it: Interpreter, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
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
        return [_pad_spatial_all(x, a["pads"])]
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


def _pad_spatial_all(x: torch.Tensor, pads: list[int]) -> torch.Tensor:
    n = x.dim()
    flat: list[int] = []
    for i in reversed(range(n)):
        flat += [pads[i], pads[i + n]]
    return F.pad(x, flat)


def _broadcast_operands(it: Interpreter, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
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


def _constant(it: Interpreter, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    t = it.const(node.params["value"])
    if node.attrs.get("broadcast"):
        t = t.expand(*it.dims(node.outputs[0].shape))
    return [t]


def _split(it: Interpreter, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.split(args[0], node.attrs["sizes"], dim=node.attrs["axis"]))


def _mul_real(it: Interpreter, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    return [_BINARY_FN[node.attrs.get("op", "mul")](args[0], args[1])]


def _add(it: Interpreter, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    if node.attrs.get("op") == "sub":
        return [args[0] - args[1]]
    out = args[0]
    for t in args[1:]:
        out = out + t
    return [out]


RULES: dict[OpKind, Callable[[Interpreter, Node, list[torch.Tensor]], list[torch.Tensor]]] = {
    OpKind.CONSTANT: _constant,
    OpKind.CONV: conv_forward,
    OpKind.LINEAR: _linear,
    OpKind.MATMUL: lambda it, n, a: [torch.matmul(a[0], a[1])],
    OpKind.ADD: _add,
    OpKind.MUL: _mul_real,
    OpKind.CONCAT: lambda it, n, a: [torch.cat(_broadcast_operands(it, n, a), dim=n.attrs["axis"])],
    OpKind.SPLIT: _split,
    OpKind.NORM: _norm_real,
    OpKind.POINTWISE: _pointwise_real,
    OpKind.POOL: _pool,
    OpKind.SOFTMAX: lambda it, n, a: [(F.log_softmax if n.attrs.get("log") else F.softmax)(a[0], dim=n.attrs["axis"])],
    OpKind.RESHAPE: _reshape,
}


# ---- rules: path-count semantics (override the real ones) --------------------------------
def _path_mul(it: Interpreter, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gate rule: a path through a product goes through one factor; the other is a unit gate."""
    a, b = args
    if node.kind is OpKind.MATMUL:
        return [torch.matmul(a, torch.ones_like(b)) + torch.matmul(torch.ones_like(a), b)]
    return [a + b]


def _path_identity(it: Interpreter, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    shape = node.outputs[0].shape
    x = args[0]
    if shape is not None and list(x.shape) != it.dims(shape):
        x = x.expand(*it.dims(shape))
    return [x]


def _path_add(it: Interpreter, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    out = args[0]
    for t in args[1:]:
        out = out + t  # a subtraction still routes paths: counts add
    return [out]


PATH_RULES: dict[OpKind, Callable[[Interpreter, Node, list[torch.Tensor]], list[torch.Tensor]]] = {
    OpKind.CONSTANT: lambda it, n, a: [torch.zeros(it.dims(n.outputs[0].shape), dtype=it.dtype, device=it.device)],
    OpKind.CONV: lambda it, n, a: conv_forward(it, n, a, bias=False),
    OpKind.LINEAR: lambda it, n, a: _linear(it, n, a, bias=False),
    OpKind.ADD: _path_add,
    OpKind.MUL: _path_mul,
    OpKind.MATMUL: _path_mul,
    OpKind.NORM: _path_identity,
    OpKind.POINTWISE: _path_identity,
    OpKind.SOFTMAX: _path_identity,
    OpKind.POOL: lambda it, n, a: _pool(it, n, a, as_sum=it.pool == "sum"),
}


# ---- attention (torch frontends: one node per nn.MultiheadAttention) ----------------------
def _attention(it: Interpreter, node: Node, args: list[torch.Tensor], *, paths: bool = False) -> list[torch.Tensor]:
    """Multi-head attention with inputs ``args[attrs["qkv"][i]]`` for query, key, value.

    Real: ``F.multi_head_attention_forward`` semantics in eval mode (no masks, no dropout):
    ``out_proj(softmax(q k^T / sqrt(d)) v)`` per head, with q/k/v the three row blocks of
    ``in_proj_weight`` (or ``q/k/v_proj_weight``) plus ``in_proj_bias``. Paths: the same
    dataflow with the masks as weights and no biases, the *gate rule* for both products
    (``paths(QK^T) = Q@1 + 1@K^T``, ``paths(AV) = A@1 + 1@V``), softmax and the 1/sqrt(d)
    scale as identity, exactly as the decomposed ONNX graph counts them. With
    ``scaling="dpai"`` the input of ``out_proj`` is divided by its max too (as it is for the
    separate out_proj linear of an ONNX graph) and the log goes into ``log_scale``. The input
    of ``out_proj`` is left in ``it.inner_values["<node>/out_proj_input"]``.
    """
    a, p = node.attrs, node.params
    q_in, k_in, v_in = (args[i] for i in a.get("qkv", (0, 0, 0)))
    if paths and it.scaling == "dpai":
        extra = torch.zeros((), dtype=it.dtype, device=it.device)
        seen = {id(q_in): q_in}
        for t in (k_in, v_in):
            if id(t) not in seen:
                m = t.max()
                if m > 0:
                    seen[id(t)] = t / m
                    extra = extra + torch.log(m)
                else:
                    seen[id(t)] = t
        k_in, v_in = seen[id(k_in)], seen[id(v_in)]
    unbatched = q_in.dim() == 2
    batch_first = a.get("batch_first", False)

    def to_nle(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(0) if unbatched else (t if batch_first else t.transpose(0, 1))

    q_in, k_in, v_in = to_nle(q_in), to_nle(k_in), to_nle(v_in)
    if "in_proj_weight" in p:
        wq, wk, wv = it.oi_weight(p["in_proj_weight"]).chunk(3, 0)
    else:
        wq, wk, wv = (it.oi_weight(p[f"{x}_proj_weight"]) for x in "qkv")
    bq = bk = bv = None
    if not paths and "in_proj_bias" in p:
        bq, bk, bv = it.weight(p["in_proj_bias"]).chunk(3, 0)
    heads = int(a["num_heads"])
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
    o = o.transpose(1, 2).reshape(n, lq, -1)
    it.__dict__.setdefault("inner_values", {})[f"{node.name}/out_proj_input"] = o  # for per-layer criteria (NPB)
    if paths and it.scaling == "dpai":
        m = o.max()
        if m > 0:
            o = o / m
            extra = extra + torch.log(m)
        it.rule_log_scale = extra  # type: ignore[attr-defined]
    bias = it.weight(p["out_proj_bias"]) if not paths and "out_proj_bias" in p else None
    out = F.linear(o, it.oi_weight(p["out_proj_weight"]), bias)
    out = out.squeeze(0) if unbatched else (out if batch_first else out.transpose(0, 1))
    return [out]


RULES[OpKind.ATTENTION] = _attention
PATH_RULES[OpKind.ATTENTION] = lambda it, n, a: _attention(it, n, a, paths=True)


# ---- opaque operators with a known meaning (attrs["op"]) -----------------------------------
Rule = Callable[[Interpreter, Node, list[torch.Tensor]], list[torch.Tensor]]


def _lookup_shape(node: Node, table: tuple[int, ...], indices: torch.Tensor) -> list[int]:
    axis = node.attrs.get("axis", 0) % len(table)
    return [*table[:axis], *indices.shape, *table[axis + 1 :]]


def _embedding(it: Interpreter, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """``table`` gathered along ``axis`` by the integer indices ``args[0]`` (ONNX Gather: an
    index ``i < 0`` reads ``i + table.shape[axis]``; for axis 0 this is ``F.embedding``)."""
    p = node.params["table"]
    idx = args[0]
    if it.lookup == "ones":
        return [torch.ones(_lookup_shape(node, p.shape, idx), dtype=it.dtype, device=it.device)]
    table = it.weight(p)
    axis = node.attrs.get("axis", 0) % table.dim()
    n = table.shape[axis]
    idx = idx.to(device=table.device, dtype=torch.int64)
    if idx.numel() and (bool((idx < -n).any()) or bool((idx >= n).any())):
        raise PaicError(f"node {node.name!r} (embedding): indices run {int(idx.min())}..{int(idx.max())}, the table has {n} entries on axis {axis}")
    idx = torch.where(idx < 0, idx + n, idx)
    flat = torch.index_select(table, axis, idx.reshape(-1))
    return [flat.reshape(_lookup_shape(node, tuple(table.shape), idx))]


def _path_embedding(it: Interpreter, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """A path source: one path starts at every output element (the indices carry none)."""
    return [torch.ones(_lookup_shape(node, node.params["table"].shape, args[0]), dtype=it.dtype, device=it.device)]


#: ``attrs["op"]`` of an opaque node -> (real rule, paths rule)
OPAQUE_RULES: dict[str, tuple[Rule, Rule]] = {
    "embedding": (_embedding, _path_embedding),
}


def rule_for(node: Node, mode: Mode) -> Rule | None:
    """The interpreter's rule for ``node`` in ``mode`` (None: the node cannot be evaluated).

    ``paths`` mode takes the path rule where one exists and the real rule otherwise; an opaque
    node has a rule only when ``attrs["op"]`` is a key of ``OPAQUE_RULES``.
    """
    if node.kind is OpKind.OPAQUE:
        pair = OPAQUE_RULES.get(node.attrs.get("op", ""))
        return None if pair is None else pair[mode == "paths"]
    return (PATH_RULES if mode == "paths" else {}).get(node.kind) or RULES.get(node.kind)


def indexes_lookups_only(value: Value) -> bool:
    """True when every reader of ``value`` is an embedding lookup (it is only ever indices)."""
    return bool(value.uses) and all(n.kind is OpKind.OPAQUE and n.attrs.get("op") == "embedding" and n.inputs[0] is value for n in value.uses)
