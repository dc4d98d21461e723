"""Dead-node elimination: remove every channel without an input->output dependence, exactly.

Per tracked channel (``coupling``) two booleans: **F** — its value depends on the model
input; **B** — it influences the model output. Both are swept at channel granularity over the
coupling links, conv/linear through the kept (out, in) pairs of their masks; every rule
over-approximates real dependence (a kept weight is assumed to carry it), so a channel found
dead is dead. A channel atom is **removed** when no value carrying it is F ∧ B:

* ¬B: nothing downstream reads it — dropped outright.
* ¬F: input-independent, a constant tensor c (a bias through BN/ReLU/GELU…). Its
  contribution to each consuming conv/linear, ``K = layer(x restricted to those channels,
  no bias)`` (real interpreter, float64, masked weights), is **folded**: uniform over the
  non-channel axes -> added to the layer's bias (else to the running mean of a BN or the
  constant of an Add that alone reads the layer: ``BN(y + k) = BN_{μ-k}(y)``; else a new
  bias Param). Not uniform (padding makes a conv of a constant vary at the borders) -> a
  constant map ``K[0:1]`` added right after the layer (``pointwise add``, "bias map").

Constraints, to a fixpoint (each only keeps more, and keeping a channel is always exact):
pinned atoms (coupling: LayerNorm/GroupNorm statistics, outputs, attention chains, shared
Params); a grouped conv's group goes whole; every tracked value keeps ≥ 1 channel; a fold
must be possible (a non-uniform K needs static non-batch dims and a batch-leading output);
with ``align=N`` conv/linear inputs and outputs keep a multiple of N channels where they can
(odd widths fall off ONNX Runtime's fast conv kernels: see docs/compact_speed.md).

Kept weights are tightened too: a kept weight reading a constant channel that stays (coupled
to a live channel elsewhere, e.g. by a residual add) is folded and masked, and a kept weight
writing a channel that reaches nothing is masked. A weight that several nodes use (tied
weights, a layer applied twice, W and Wᵀ) is a boundary: its channels are pinned, it is never
masked here and nothing is folded into it (its constant inputs stay), since any change would
reach its other uses; a shared bias gets a folded constant as an add after the layer. The
pass runs to a fixpoint (a grouped conv left with one group frees its inputs), so running it
twice changes nothing.

Exactness: the removed channels of a value are each either constant (their exact
contribution is folded) or read by nothing that reaches the output, so the compact model
computes the masked model's function. MACs: every kept weight of the compact model joins an
F input channel to a B output channel, so its nonzero conv/linear MACs equal the masked
model's effective MACs (``flops``) whenever channel-level reachability equals node-path's
element-level one (every position of a live channel is live, as in CNNs with whole kernels
and a global-pool head, and the example models' ERK masks); they are an upper bound when reachability is
partial over positions (a sparse kernel at the borders, a flatten head with sparse columns) or
when channels stay pinned (LayerNorm, attention) that node-path's identity rules call dead.
Weight-free nodes (norm, pointwise, pool, add) shrink with their channels and bias maps add
one MAC per element. ``graph.meta["compact"]`` records per-layer channel counts.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import sympy

from pai_compiler.ir import Graph, Node, OpKind, Param, Value
from pai_compiler.pass_infra import AnalysisManager, PassResult, TransformPass
from pai_compiler.passes.analysis.coupling import ChannelSpaces, channel_spaces, param_slices

__all__ = ["DeadNodeElimPass", "channel_liveness", "plan_removal", "RemovalPlan"]

_WEIGHTED = (OpKind.CONV, OpKind.LINEAR)
_MAX_ROUNDS = 16


# ---- liveness ------------------------------------------------------------------------------
def _connectivity(node: Node, cs: ChannelSpaces) -> np.ndarray:
    """(len y, len x) bool: output index o reads input index i through a kept weight."""
    w = node.params["weight"]
    oi = w.to_oi(w.mask_or_ones())
    n_out = oi.shape[0]
    if cs.track(node.outputs[0]) is not None and n_out != cs.size(node.outputs[0]):
        # the Param's out/in axes do not describe this use (a hand-built graph): every output
        # reads every input, which is always safe
        return np.ones((cs.size(node.outputs[0]), cs.size(node.inputs[0])), dtype=bool)
    local = oi.reshape(n_out, oi.shape[1], -1).any(axis=2)  # (out, in per group)
    groups = int(node.attrs.get("groups", 1)) if node.kind is OpKind.CONV else 1
    per_out, per_in = n_out // groups, local.shape[1]
    full = np.zeros((n_out, per_in * groups), dtype=bool)
    for g in range(groups):
        full[g * per_out:(g + 1) * per_out, g * per_in:(g + 1) * per_in] = local[g * per_out:(g + 1) * per_out]
    x, y = node.inputs[0], node.outputs[0]
    tx = cs.track(x)
    consumed = 1 if node.kind is OpKind.CONV else (len(x.shape) - 1 if x.shape is not None else -1)
    if tx is None or tx.axis != consumed or len(tx.atoms) != full.shape[1]:
        full = np.repeat(full.any(axis=1, keepdims=True), cs.size(x), axis=1)
    if cs.track(y) is None:
        full = full.any(axis=0, keepdims=True)
    return full


def _reads_track(node: Node, cs: ChannelSpaces) -> bool:
    """Is the conv/linear input tracked on the axis the layer reduces (its in-channels)?"""
    x = node.inputs[0]
    t = cs.track(x)
    if t is None or x.shape is None:
        return False
    return t.axis == (1 if node.kind is OpKind.CONV else len(x.shape) - 1)


def channel_liveness(graph: Graph, cs: ChannelSpaces) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(F, B) per value: bool vectors over its tracked channels (length 1 when untracked)."""
    fwd: dict[str, np.ndarray] = {}
    conns: dict[str, np.ndarray] = {}
    for node in graph.nodes:
        if node.kind is OpKind.OUTPUT:
            continue
        if node.kind in (OpKind.INPUT, OpKind.CONSTANT):
            for v in node.outputs:
                fwd[v.name] = np.full(cs.size(v), node.kind is OpKind.INPUT)
            continue
        if node.kind in _WEIGHTED:
            conn = conns[node.name] = _connectivity(node, cs)
            fwd[node.outputs[0].name] = (conn & fwd[node.inputs[0].name][None, :]).any(axis=1)
            continue
        outs = [np.zeros(cs.size(v), dtype=bool) for v in node.outputs]
        for link in cs.links.get(node.name, []):
            src = fwd[node.inputs[link.input].name]
            dst = outs[link.output]
            if link.index is None:
                dst |= bool(src.any())
            else:
                valid = link.index >= 0
                dst[valid] |= src[link.index[valid]]
        for v, f in zip(node.outputs, outs):
            fwd[v.name] = f
    bwd = {name: np.zeros(len(f), dtype=bool) for name, f in fwd.items()}
    for node in reversed(graph.nodes):
        if node.kind is OpKind.OUTPUT:
            bwd[node.inputs[0].name][:] = True
        elif node.kind in _WEIGHTED:
            conn = conns[node.name]
            bwd[node.inputs[0].name] |= (conn & bwd[node.outputs[0].name][:, None]).any(axis=0)
        else:
            for link in cs.links.get(node.name, []):
                src = bwd[node.outputs[link.output].name]
                dst = bwd[node.inputs[link.input].name]
                if link.index is None:
                    dst |= bool(src.any())
                else:
                    valid = link.index >= 0
                    np.logical_or.at(dst, link.index[valid], src[valid])
    return fwd, bwd


# ---- folding constants ---------------------------------------------------------------------
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


class _Constants:
    """The masked model's values on a zero input (float64), computed on first use."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.batch_symbols: set[str] = set()
        for v in graph.inputs:
            if v.shape and isinstance(v.shape[0], sympy.Basic):
                self.batch_symbols |= {s.name for s in v.shape[0].free_symbols}
        self._it: Any = None
        self.values: Mapping[str, Any] = {}  # every value of the zero-input run
        self.error: str | None = None

    def interpreter(self) -> Any:
        if self._it is None and self.error is None:
            import torch

            from pai_compiler.interp import Interpreter

            symbols = {str(s) for s in self.graph.meta.get("symbols", {})}
            for node in self.graph.nodes:
                for v in (*node.inputs, *node.outputs):
                    for d in v.shape or ():
                        if isinstance(d, sympy.Basic):
                            symbols |= {s.name for s in d.free_symbols}
            it = Interpreter(self.graph, mode="real", dtype=torch.float64, bind={s: 1 for s in symbols})
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

    def dynamic(self, value: Value) -> bool:
        """Does the value's shape hold a symbol other than the batch size?"""
        return any(isinstance(d, sympy.Basic) and {s.name for s in d.free_symbols} - self.batch_symbols for d in value.shape or ())


def _contribution(node: Node, channels: np.ndarray, consts: _Constants) -> tuple[np.ndarray, bool] | None:
    """(K, uniform) for the constant input ``channels`` of a conv/linear, or None if unknown."""
    import torch
    import torch.nn.functional as F

    from pai_compiler.interp import _conv

    it = consts.interpreter()
    if it is None:
        return None
    x = consts.values[node.inputs[0].name]
    axis = 1 if node.kind is OpKind.CONV else x.dim() - 1
    index = torch.as_tensor(channels, dtype=torch.long)
    only = torch.zeros_like(x)
    only.index_copy_(axis, index, x.index_select(axis, index))
    with torch.no_grad():
        if node.kind is OpKind.CONV:
            k = _conv(it, node, [only], bias=False)[0]
        else:
            k = F.linear(only, it.oi_weight(node.params["weight"])) * float(node.attrs.get("alpha", 1.0))
    out_axis = 1 if node.kind is OpKind.CONV else k.dim() - 1
    flat = k.movedim(out_axis, 0).reshape(k.shape[out_axis], -1)
    spread = (flat.max(dim=1).values - flat.min(dim=1).values).abs()
    uniform = bool((spread <= 1e-9 * (1.0 + flat.abs().max(dim=1).values)).all())
    if consts.dynamic(node.inputs[0]) or consts.dynamic(node.outputs[0]):
        src = only.index_select(axis, index).movedim(axis, 0).reshape(len(channels), -1)
        flat_in = bool(((src.max(dim=1).values - src.min(dim=1).values).abs() <= 1e-12 * (1.0 + src.abs().max(dim=1).values)).all())
        no_pad = node.kind is OpKind.LINEAR or not any(node.attrs.get("pads", []))
        uniform = uniform and flat_in and no_pad
        if not uniform:
            return None
    return k.numpy(), uniform


def _fold_for(node: Node, channels: np.ndarray, consts: _Constants) -> Fold | None:
    got = _contribution(node, channels, consts)
    if got is None:
        return None
    k, uniform = got
    out_axis = 1 if node.kind is OpKind.CONV else k.ndim - 1
    if uniform:
        per_channel = np.moveaxis(k, out_axis, 0).reshape(k.shape[out_axis], -1).mean(axis=1)
        return Fold(node.name, channels, bias=per_channel)
    lead = node.outputs[0].shape[0] if node.outputs[0].shape else None
    batch_lead = isinstance(lead, int) or (isinstance(lead, sympy.Symbol) and lead.name in consts.batch_symbols)
    if not batch_lead or k.shape[0] not in (1, lead):
        return None
    return Fold(node.name, channels, map=k[:1] if not isinstance(lead, int) else k)


# ---- planning ------------------------------------------------------------------------------
@dataclass
class RemovalPlan:
    """Which atoms go, the index masks per value, and the folds per consumer."""

    removed: set[int]
    keep: dict[str, np.ndarray]  # value name -> bool per tracked index (only values that shrink)
    folds: dict[str, Fold]
    kept_dead: dict[str, int]  # reason -> dead atoms kept for it
    dead_rows: dict[str, np.ndarray]  # weighted node -> kept output indices that reach nothing

    @property
    def empty(self) -> bool:
        return not self.keep and not self.dead_rows and not any(f.mask_in is not None and len(f.mask_in) for f in self.folds.values())


def _users_of_storage(graph: Graph, param: Param) -> int:
    """How many nodes read ``param``'s stored tensor (through it or a layout twin)."""
    return sum(any(p.storage == param.storage for p in n.params.values()) for n in graph.nodes)


def _shared_weights(graph: Graph) -> set[str]:
    """Conv/linear nodes whose weight Param another node uses too (tied or reused weights).

    Such a weight is a boundary: coupling pins the channels it indexes (never sliced), and it
    is never tightened nor folded into, since masking it for one user would change what every
    other user computes (possibly in another layout)."""
    users: dict[object, int] = {}
    for node in graph.nodes:
        for k in {p.storage for p in node.params.values()}:
            users[k] = users.get(k, 0) + 1
    return {n.name for n in graph.nodes if n.kind in _WEIGHTED and users[n.params["weight"].storage] > 1}


def plan_removal(graph: Graph, cs: ChannelSpaces, *, fold: bool = True, align: int = 1) -> RemovalPlan:
    """Decide which channel atoms go, which constants are folded where, and which kept weights
    are masked (``dead_rows``, ``Fold.mask_in``); see the module docstring for the rules."""
    fwd, bwd = channel_liveness(graph, cs)
    conns = {n.name: _connectivity(n, cs) for n in graph.nodes if n.kind in _WEIGHTED}
    roots = {name: cs.roots(t.atoms) for name, t in cs.tracks.items()}
    every: set[int] = set()
    live: set[int] = set()
    for name, r in roots.items():
        every.update(r.tolist())
        live.update(r[fwd[name] & bwd[name]].tolist())
    dead = every - live
    reasons: dict[int, str] = {}
    for root, why in cs.pinned_roots().items():
        if root in dead:
            reasons[root] = why.split(":")[-1].strip()
    keep = live | set(reasons)
    together = [cs.roots(s) for s in cs.together]
    aligned = {v.name for n in graph.nodes if n.kind in _WEIGHTED for v in (n.inputs[0], n.outputs[0]) if v.name in roots} if align > 1 else set()
    consts = _Constants(graph)
    shared = _shared_weights(graph)
    folds: dict[str, Fold] = {}
    changed = True
    while changed:
        changed = False
        for group in together:
            if any(int(r) in keep for r in group) and not all(int(r) in keep for r in group):
                for r in group.tolist():
                    if r not in keep:
                        keep.add(r)
                        reasons.setdefault(r, "grouped conv keeps whole groups")
                changed = True
        for name, r in roots.items():
            if len(r) and not any(int(a) in keep for a in r):
                keep.add(int(r[0]))
                reasons.setdefault(int(r[0]), "a value keeps at least one channel")
                changed = True
        for name in aligned:
            r = roots[name]
            gone = [int(a) for a in r if int(a) not in keep]
            short = (-(len(r) - len(gone))) % align
            if gone and short:
                for a in gone[:short]:
                    keep.add(a)
                    reasons.setdefault(a, f"channel counts aligned to {align}")
                changed = True
        folds = {}
        for node in graph.nodes:
            if node.kind not in _WEIGHTED or not _reads_track(node, cs):
                continue
            x = node.inputs[0].name
            gone = np.array([int(a) not in keep for a in roots[x]], dtype=bool)
            used = conns[node.name].any(axis=0) if conns[node.name].shape[1] == len(gone) else np.zeros(len(gone), bool)
            removed_const = gone & ~fwd[x]
            kept_const = ~gone & ~fwd[x] & used
            if node.name in shared:
                # a folded channel's weights must be masked, which would change the other
                # users of the weight: constant inputs of a shared weight stay, unfolded
                if removed_const.any():
                    for a in roots[x][removed_const].tolist():
                        keep.add(a)
                        reasons.setdefault(a, "constant channel read by a shared weight")
                    changed = True
                continue
            result = None
            if fold and (removed_const.any() or kept_const.any()):
                result = _fold_for(node, np.flatnonzero(removed_const | kept_const), consts)
                if result is None and removed_const.any() and kept_const.any():
                    result = _fold_for(node, np.flatnonzero(removed_const), consts)
            if result is not None:
                result.mask_in = np.intersect1d(result.channels, np.flatnonzero(kept_const))
                folds[node.name] = result
            elif removed_const.any():
                for a in roots[x][removed_const].tolist():
                    keep.add(a)
                    reasons.setdefault(a, "constant channel that cannot be folded")
                changed = True
    removed = every - keep
    masks = {}
    for name, r in roots.items():
        m = np.array([int(a) not in removed for a in r], dtype=bool)
        if not m.all():
            masks[name] = m
    kept_dead: dict[str, int] = {}
    for root in dead & keep:
        why = reasons.get(root, "kept")
        kept_dead[why] = kept_dead.get(why, 0) + 1
    dead_rows = {}
    for node in graph.nodes:
        y = node.outputs[0].name if node.kind in _WEIGHTED else None
        if y is None or y not in roots or node.name in shared:  # a shared weight is never masked here
            continue
        stays = np.array([int(a) not in removed for a in roots[y]], dtype=bool)
        rows = np.flatnonzero(stays & ~bwd[y] & conns[node.name].any(axis=1))
        if len(rows):
            dead_rows[node.name] = rows
    return RemovalPlan(removed, masks, folds, kept_dead, dead_rows)


def _tighten(graph: Graph, node: Node, rows: np.ndarray | None, cols: np.ndarray | None) -> int:
    """Drop kept weights of output ``rows`` / input ``cols`` (exact: see the module docstring)."""
    w = node.params["weight"]
    keep = w.mask_or_ones().copy()
    oi = w.to_oi(keep)  # a view: writes go to ``keep``
    groups = int(node.attrs.get("groups", 1)) if node.kind is OpKind.CONV else 1
    per_out, per_in = oi.shape[0] // groups, oi.shape[1]
    before = int(keep.sum())
    if rows is not None:
        oi[rows] = False
    for i in (cols if cols is not None else []):
        g = int(i) // per_in
        oi[g * per_out:(g + 1) * per_out, int(i) - g * per_in] = False
    dropped = before - int(keep.sum())
    if dropped:
        if w.prunable:
            graph.set_mask(w, keep)
        else:  # a dense (excluded) layer: zero the weights instead of masking them
            graph.set_param_data(w, np.where(keep, w.data, 0).astype(w.data.dtype))
    return dropped


# ---- applying ------------------------------------------------------------------------------
def _slice_param(graph: Graph, p: Param, axis: int, keep: np.ndarray) -> None:
    index = np.flatnonzero(keep)
    mask = None if p.mask is None else np.take(p.mask, index, axis=axis)
    graph.set_mask(p, None)
    graph.set_param_data(p, np.ascontiguousarray(np.take(p.data, index, axis=axis)))
    if mask is not None:
        graph.set_mask(p, mask)


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


def _fold_bias(graph: Graph, node: Node, bias: np.ndarray) -> tuple[str, str]:
    """Add a per-channel constant to ``node``'s output; return where it went.

    A bias (BN mean, add constant) that other nodes use too is left alone: the constant goes
    to a fresh Param, added after the layer when it already has a (shared) bias."""
    shared_bias = "bias" in node.params and _users_of_storage(graph, node.params["bias"]) > 1
    if "bias" in node.params and not shared_bias:
        p = node.params["bias"]
        graph.set_param_data(p, (p.data + bias / float(node.attrs.get("beta", 1.0))).astype(p.data.dtype))
        return "bias", p.name
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
    w = node.params["weight"]
    if shared_bias:  # a per-channel constant added right after the layer (written as an Add)
        spatial = w.data.ndim - 2 if node.kind is OpKind.CONV else 0
        return _bias_map(graph, node, bias.reshape(len(bias), *[1] * spatial))
    p = Param(graph.fresh_name(f"{node.name}.folded_bias"), bias.astype(w.data.dtype), prunable=False, out_axis=0, in_axis=None)
    node = _with_params(graph, node, {**node.params, "bias": p})
    if node.kind is OpKind.LINEAR and "beta" in node.attrs:
        graph.set_attr(node, "beta", 1.0)
    return "new bias", p.name


def _bias_map(graph: Graph, node: Node, data: np.ndarray) -> tuple[str, str]:
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


def _apply(graph: Graph, cs: ChannelSpaces, plan: RemovalPlan) -> dict[str, Any]:
    record: dict[str, Any] = {"layers": {}, "folds": [], "reshapes": [], "splits": [], "weights_dropped": 0, "changed_params": []}
    keep = plan.keep
    for node in [n for n in graph.nodes if n.kind in _WEIGHTED]:
        fold = plan.folds.get(node.name)
        cols = fold.mask_in if fold is not None else None
        dropped = _tighten(graph, node, plan.dead_rows.get(node.name), cols)
        if dropped:
            record["weights_dropped"] += dropped
            record["changed_params"].append(node.params["weight"].name)
    for node in [n for n in graph.nodes if n.kind in _WEIGHTED]:
        w = node.params["weight"]
        record["layers"][w.name] = {"node": node.name, "op": node.kind.value, "shape_before": list(w.shape)}
    groups_before = {n.name: (int(n.attrs.get("groups", 1)), n.params["weight"].shape[0]) for n in graph.nodes if n.kind is OpKind.CONV}
    done: set[tuple[int, int]] = set()
    for node in graph.nodes:
        for p, axis, value in param_slices(node, cs):
            if value.name in keep and (id(p), axis) not in done:
                done.add((id(p), axis))
                _slice_param(graph, p, axis, keep[value.name])
                record["changed_params"].append(p.name)
    for name, m in keep.items():
        v = graph.value(name)
        t = cs.tracks[name]
        shape = list(v.shape)  # type: ignore[arg-type]
        shape[t.axis] = int(m.sum())
        graph.set_shape(v, tuple(shape))
    for node in graph.nodes:
        changed_out = any(v.name in keep for v in node.outputs)
        if node.kind is OpKind.CONV and node.name in groups_before:
            groups, n_out = groups_before[node.name]
            if groups > 1 and changed_out:
                graph.set_attr(node, "groups", node.params["weight"].shape[0] // (n_out // groups))
        elif node.kind is OpKind.LINEAR:
            w = node.params["weight"]
            if (w.shape[w.out_axis], w.shape[w.in_axis]) != (node.attrs.get("out_features"), node.attrs.get("in_features")):  # type: ignore[index]
                graph.set_attr(node, "out_features", w.shape[w.out_axis])
                graph.set_attr(node, "in_features", w.shape[w.in_axis])  # type: ignore[index]
        elif node.kind is OpKind.RESHAPE and node.attrs.get("op") == "reshape" and changed_out and node.attrs.get("shape") is not None:
            graph.set_attr(node, "shape", list(node.outputs[0].shape or ()))
            record["reshapes"].append(node.name)
        elif node.kind is OpKind.SPLIT and node.inputs[0].name in keep:
            graph.set_attr(node, "sizes", [int(v.shape[node.attrs["axis"]]) for v in node.outputs])  # type: ignore[index]
            record["splits"].append(node.name)
    for name, f in plan.folds.items():
        node = graph.node(name)
        y = node.outputs[0].name
        out_keep = keep.get(y)
        if f.bias is not None:
            bias = f.bias if out_keep is None else f.bias[out_keep]
            where, changed = _fold_bias(graph, node, bias)
        else:
            assert f.map is not None
            axis = 1 if node.kind is OpKind.CONV else f.map.ndim - 1
            data = f.map if out_keep is None else np.compress(out_keep, f.map, axis=axis)
            where, changed = _bias_map(graph, node, data)
        record["changed_params"].append(changed)
        record["folds"].append({"node": name, "constant_channels": int(len(f.channels)), "into": where})
    for node in [n for n in graph.nodes if n.kind in _WEIGHTED]:
        w = node.params["weight"]
        row = record["layers"].setdefault(w.name, {"node": node.name, "op": node.kind.value, "shape_before": list(w.shape)})
        row["shape_after"] = list(w.shape)
        for key, axis in (("out", w.out_axis), ("in", w.in_axis)):
            if axis is not None:
                row[key] = [row["shape_before"][axis], w.shape[axis]]
    return record


def _merge_record(graph: Graph, record: dict[str, Any], plan: RemovalPlan) -> None:
    old = graph.meta.get("compact")
    if old:
        for name, row in record["layers"].items():
            first = old["layers"].get(name)
            if first is not None:
                row["shape_before"] = first["shape_before"]
                for key in ("out", "in"):
                    if key in row and key in first:
                        row[key][0] = first[key][0]
        for key in ("folds", "reshapes", "splits", "changed_params"):
            record[key] = old.get(key, []) + record[key]
        record["weights_dropped"] += old.get("weights_dropped", 0)
    record["changed_params"] = sorted(set(record["changed_params"]))
    record["kept_dead_channels"] = dict(plan.kept_dead)
    record["removed_atoms"] = len(plan.removed) + (old.get("removed_atoms", 0) if old else 0)
    graph.meta["compact"] = record


@dataclass(frozen=True)
class DeadNodeElimPass(TransformPass):
    """Remove dead channels/neurons (folding constant ones into biases); function unchanged."""

    name: ClassVar[str] = "dead-node-elim"
    fold: bool = True
    align: int = 1

    def __post_init__(self) -> None:
        if self.align < 1:
            from pai_compiler.errors import UsageError

            raise UsageError(f"dead-node-elim: align must be a positive integer, got {self.align}")

    def run(self, graph: Graph, am: AnalysisManager) -> PassResult:
        # to a fixpoint, so a second run finds nothing: a grouped conv left with one group
        # no longer ties its input channels together, which frees more of them
        modified = False
        for _ in range(_MAX_ROUNDS):
            cs = channel_spaces(graph)
            plan = plan_removal(graph, cs, fold=self.fold, align=self.align)
            if plan.empty:
                break
            _merge_record(graph, _apply(graph, cs, plan), plan)
            modified = True
        return PassResult(modified=modified, preserved=frozenset())
