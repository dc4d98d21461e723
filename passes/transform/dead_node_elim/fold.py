"""Folding constant channels: a conv/linear's contribution ``K = layer(x restricted to constant channels, no bias)``.

``x`` is the masked model's value on a zero input (real interpreter, float64). K uniform over
the non-channel axes -> a per-channel bias (``fold_bias``: the layer's bias, else the running
mean of a BN that alone reads the layer, ``BN(y + k) = BN_{μ-k}(y)``, else the constant of an
Add that alone reads it, else a new bias Param). Not uniform (padding makes a conv of a
constant vary at the borders) -> a constant map added right after the layer (``bias_map``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pai_compiler.ir import Graph, Node, OpKind, Param, Value
from pai_compiler.ir.dims import is_symbol, is_symbolic

__all__ = ["Fold", "ZeroInputValues", "fold_for", "fold_bias", "bias_map", "users_of_storage"]


@dataclass
class Fold:
    """A consumer's constant contribution: per-channel ``bias`` (uniform) or a full ``map``.

    ``channels``: the constant input indices folded; ``mask_in``: those of them that stay
    (coupled to a live channel elsewhere) — their weights are masked once folded.
    """

    node: str
    channels: np.ndarray
    bias: np.ndarray | None = None
    map: np.ndarray | None = None
    mask_in: np.ndarray | None = None


class ZeroInputValues:
    """The masked model's values on a zero input (float64), computed on first use."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.batch_symbols: set[str] = set()
        for v in graph.inputs:
            if v.shape and is_symbolic(v.shape[0]):
                self.batch_symbols |= {s.name for s in v.shape[0].free_symbols}
        self._it: Any = None
        self.values: Mapping[str, Any] = {}  # every value of the zero-input run
        self.error: str | None = None

    def interpreter(self) -> Any:
        """The interpreter after its zero-input run, or None when the graph cannot run."""
        if self._it is None and self.error is None:
            import torch  # heavy: only when a constant channel needs folding

            from pai_compiler.interp import Interpreter  # heavy: imports torch

            it = Interpreter(self.graph, mode="real", dtype=torch.float64, bind={s: 1 for s in self._symbols()})
            try:
                feeds = []
                for v in self.graph.inputs:
                    dtype = torch.float64 if "float" in v.dtype else torch.int64
                    feeds.append(torch.zeros(it.dims(v.shape or ()), dtype=dtype))
                with torch.no_grad():
                    self.values = it.run(feeds).values
                self._it = it
            except Exception as exc:  # opaque node, unbound dim...: no folding possible
                self.error = f"{type(exc).__name__}: {exc}"
        return self._it

    def _symbols(self) -> set[str]:
        symbols = {str(s) for s in self.graph.meta.get("symbols", {})}
        for node in self.graph.nodes:
            for v in (*node.inputs, *node.outputs):
                for d in v.shape or ():
                    if is_symbolic(d):
                        symbols |= {s.name for s in d.free_symbols}
        return symbols

    def dynamic(self, value: Value) -> bool:
        """Does the value's shape hold a symbol other than the batch size?"""
        return any(is_symbolic(d) and {s.name for s in d.free_symbols} - self.batch_symbols for d in value.shape or ())


def _contribution(node: Node, channels: np.ndarray, values: ZeroInputValues) -> tuple[np.ndarray, bool] | None:
    """(K, uniform) for the constant input ``channels`` of a conv/linear, or None if unknown."""
    import torch  # heavy: see ZeroInputValues.interpreter
    import torch.nn.functional as F

    from pai_compiler.interp_tables import conv_forward  # heavy: imports torch

    it = values.interpreter()
    if it is None:
        return None
    x = values.values[node.inputs[0].name]
    axis = 1 if node.kind is OpKind.CONV else x.dim() - 1
    index = torch.as_tensor(channels, dtype=torch.long)
    only = torch.zeros_like(x)
    only.index_copy_(axis, index, x.index_select(axis, index))
    with torch.no_grad():
        if node.kind is OpKind.CONV:
            k = conv_forward(it, node, [only], bias=False)[0]
        else:
            k = F.linear(only, it.oi_weight(node.params["weight"])) * float(node.attrs.get("alpha", 1.0))
    out_axis = 1 if node.kind is OpKind.CONV else k.dim() - 1
    flat = k.movedim(out_axis, 0).reshape(k.shape[out_axis], -1)
    spread = (flat.max(dim=1).values - flat.min(dim=1).values).abs()
    uniform = bool((spread <= 1e-9 * (1.0 + flat.abs().max(dim=1).values)).all())
    if values.dynamic(node.inputs[0]) or values.dynamic(node.outputs[0]):
        src = only.index_select(axis, index).movedim(axis, 0).reshape(len(channels), -1)
        flat_in = bool(((src.max(dim=1).values - src.min(dim=1).values).abs() <= 1e-12 * (1.0 + src.abs().max(dim=1).values)).all())
        no_pad = node.kind is OpKind.LINEAR or not any(node.attrs.get("pads", []))
        uniform = uniform and flat_in and no_pad
        if not uniform:
            return None
    return k.numpy(), uniform


def fold_for(node: Node, channels: np.ndarray, values: ZeroInputValues) -> Fold | None:
    """The fold of ``node``'s constant input ``channels``, or None when it cannot be folded."""
    got = _contribution(node, channels, values)
    if got is None:
        return None
    k, uniform = got
    out_axis = 1 if node.kind is OpKind.CONV else k.ndim - 1
    if uniform:
        per_channel = np.moveaxis(k, out_axis, 0).reshape(k.shape[out_axis], -1).mean(axis=1)
        return Fold(node.name, channels, bias=per_channel)
    lead = node.outputs[0].shape[0] if node.outputs[0].shape else None
    batch_lead = isinstance(lead, int) or (is_symbol(lead) and lead.name in values.batch_symbols)
    if not batch_lead or k.shape[0] not in (1, lead):
        return None
    return Fold(node.name, channels, map=k[:1] if not isinstance(lead, int) else k)


def users_of_storage(graph: Graph, param: Param) -> int:
    """How many nodes read ``param``'s stored tensor (through it or a layout twin)."""
    return sum(any(p.storage == param.storage for p in n.params.values()) for n in graph.nodes)


def _with_params(graph: Graph, node: Node, params: dict[str, Param]) -> Node:
    """Rebuild ``node`` with ``params`` (same name, outputs, attrs) through Graph methods."""
    outs = [(v.name, v.shape, v.dtype) for v in node.outputs]
    tmp = graph.add_node(node.kind, graph.fresh_name(node.name + "_dne"), node.inputs,
                         [(graph.fresh_name(v.name + "_dne"), v.shape, v.dtype) for v in node.outputs],
                         params=node.params, attrs=node.attrs, origin=node.origin, before=node)
    for old, new in zip(node.outputs, tmp.outputs):
        graph.replace_all_uses(old, new)
    graph.remove_node(node)
    final = graph.add_node(node.kind, node.name, tmp.inputs, outs, params=params, attrs=dict(node.attrs), origin=node.origin, before=tmp)
    for old, new in zip(tmp.outputs, final.outputs):
        graph.replace_all_uses(old, new)
    graph.remove_node(tmp)
    return final


def fold_bias(graph: Graph, node: Node, bias: np.ndarray) -> tuple[str, str]:
    """Add a per-channel constant to ``node``'s output; return (where it went, the Param changed).

    A bias (BN mean, add constant) that other nodes use too is left alone: the constant goes
    to a fresh Param, added after the layer when it already has a (shared) bias."""
    shared_bias = "bias" in node.params and users_of_storage(graph, node.params["bias"]) > 1
    if "bias" in node.params and not shared_bias:
        p = node.params["bias"]
        graph.set_param_data(p, (p.data + bias / float(node.attrs.get("beta", 1.0))).astype(p.data.dtype))
        return "bias", p.name
    into_follower = _fold_into_follower(graph, node, bias)
    if into_follower is not None:
        return into_follower
    w = node.params["weight"]
    if shared_bias:  # a per-channel constant added right after the layer (written as an Add)
        spatial = w.data.ndim - 2 if node.kind is OpKind.CONV else 0
        return bias_map(graph, node, bias.reshape(len(bias), *[1] * spatial))
    p = Param(graph.fresh_name(f"{node.name}.folded_bias"), bias.astype(w.data.dtype), prunable=False, out_axis=0, in_axis=None)
    node = _with_params(graph, node, {**node.params, "bias": p})
    if node.kind is OpKind.LINEAR and "beta" in node.attrs:
        graph.set_attr(node, "beta", 1.0)
    return "new bias", p.name


def _fold_into_follower(graph: Graph, node: Node, bias: np.ndarray) -> tuple[str, str] | None:
    """Fold into the BN running mean or Add constant of the node's only reader, if it can take it."""
    y = node.outputs[0]
    rank = len(y.shape) if y.shape is not None else 0
    channel_axis = 1 if node.kind is OpKind.CONV else rank - 1
    user = y.uses[0] if len(y.uses) == 1 else None
    if user is not None and user.kind is OpKind.NORM and user.attrs.get("type") == "batch" and channel_axis == 1:
        mean = user.params.get("mean")
        if mean is not None and len(graph.param_users(mean)) == 1 and mean.shape == bias.shape:
            graph.set_param_data(mean, (mean.data - bias).astype(mean.data.dtype))  # BN(y + k) = BN_{mean-k}(y)
            return "batchnorm running mean", mean.name
    if user is not None and user.kind is OpKind.POINTWISE and user.attrs.get("op") in ("add", "sub"):
        c = user.params.get("const")
        if c is not None and len(graph.param_users(c)) == 1 and np.issubdtype(c.data.dtype, np.floating):
            pa = channel_axis - (rank - c.data.ndim)
            if 0 <= pa < c.data.ndim and c.shape[pa] == len(bias) and all(d == 1 for i, d in enumerate(c.shape) if i != pa):
                sign = -1.0 if user.attrs["op"] == "sub" else 1.0  # (y+k)-c = y-(c-k); c-(y+k) = (c-k)-y
                shape = [1] * c.data.ndim
                shape[pa] = len(bias)
                graph.set_param_data(c, (c.data + sign * bias.reshape(shape)).astype(c.data.dtype))
                return "following add constant", c.name
    return None


def bias_map(graph: Graph, node: Node, data: np.ndarray) -> tuple[str, str]:
    """Add the constant ``data`` right after ``node`` (a ``pointwise add``, ``folded="bias_map"``)."""
    y = node.outputs[0]
    users = list(y.uses)
    order = list(graph.nodes)
    after = order[order.index(node) + 1] if order.index(node) + 1 < len(order) else None
    p = Param(graph.fresh_name(f"{node.name}.folded_bias_map"), data.astype(node.params["weight"].data.dtype), prunable=False, out_axis=0, in_axis=None)
    add = graph.add_node(OpKind.POINTWISE, graph.fresh_name(f"{node.name}_folded"), [y],
                         [(graph.fresh_name(f"{y.name}_folded"), y.shape, y.dtype)],
                         params={"const": p}, attrs={"op": "add", "const_first": False, "folded": "bias_map"}, before=after)
    for user in users:
        for i, v in enumerate(user.inputs):
            if v is y:
                graph.set_input(user, i, add.outputs[0])
    return "bias map", p.name
