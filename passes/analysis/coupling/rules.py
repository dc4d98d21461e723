"""Channel coupling rules per OpKind (``COUPLING_RULES``) and ``channel_spaces``, which applies them.

Each rule joins the atoms of a node's operands and results or pins them (the table is in the
package docstring); the layout rules (reshape, concat, split) are in ``layout``.
``channel_spaces`` also pins the channels of any sliceable Param several nodes share.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pai_compiler.ir import Graph, Node, OpKind
from pai_compiler.passes.analysis.coupling.layout import concat_rule, reshape_rule, split_rule
from pai_compiler.passes.analysis.coupling.slices import param_slices
from pai_compiler.passes.analysis.coupling.tracks import ChannelSpaces, Link, TrackBuilder, rank_of

__all__ = ["CouplingRule", "COUPLING_RULES", "channel_spaces"]


def _elementwise(node: Node, b: TrackBuilder) -> None:
    """Operands broadcast (right-aligned); full-size operands share atoms on the channel axis."""
    out = node.outputs[0]
    r = rank_of(out)
    if r is None or any(rank_of(v) is None for v in node.inputs):
        return b.mix(node, "unknown rank")
    axes = {t.axis + r - rank_of(v) for v in node.inputs if (t := b.cs.track(v)) is not None}  # type: ignore[operator]
    if len(axes) != 1:
        return b.mix(node, "operands disagree on the channel axis" if axes else "no tracked operand")
    k = axes.pop()
    n = out.shape[k]  # type: ignore[index]
    if not isinstance(n, int):
        return b.mix(node, "symbolic channel count")
    atoms: np.ndarray | None = None
    joined: list[int] = []
    for i, v in enumerate(node.inputs):
        kv = k - (r - rank_of(v))  # type: ignore[operator]
        if kv < 0 or (v.shape[kv] == 1 and n != 1):  # type: ignore[index]
            b.link(node, i, 0, None)  # broadcast along the channels: every channel reads it
            continue
        t = b.adopt(v, kv)
        if t is None or t.axis != kv or len(t.atoms) != n:
            return b.mix(node, f"operand {v.name!r} is not channel-tracked")
        if atoms is None:
            atoms = t.atoms
        else:
            b.cs.union(atoms, t.atoms)
        joined.append(i)
    assert atoms is not None
    b.set(out, k, atoms)
    for i in joined:
        b.link(node, i, 0, np.arange(n))


def _unary_pass(node: Node, b: TrackBuilder, axis_map: Callable[[int], int | None]) -> None:
    """Single-input node: channels pass to output 0 on ``axis_map(axis)`` (None: pin)."""
    t = b.cs.track(node.inputs[0])
    if t is None:
        return b.mix(node, "untracked input")
    k = axis_map(t.axis)
    if k is None:
        return b.mix(node, "mixes the channel axis")
    b.same(node, 0, 0, k)


def _conv(node: Node, b: TrackBuilder) -> None:
    x, out = node.inputs[0], node.outputs[0]
    groups = int(node.attrs.get("groups", 1))
    w = node.params["weight"]
    t = b.cs.track(x)
    c_in = x.shape[1] if x.shape is not None else None
    c_out = w.shape[w.out_axis]
    if t is not None and t.axis != 1:
        b.cs.pin(x, f"conv {node.name!r} reads a tracked axis other than its channels")
        t = None
    if groups > 1 and t is not None and groups == c_in == c_out:  # depthwise: in = out
        b.same(node, 0, 0, 1)
        return
    b.fresh(out, 1)
    if groups > 1:
        if t is None:
            b.cs.pin(out, f"grouped conv {node.name!r} with an untracked input")
            return
        o_atoms = b.cs.tracks[out.name].atoms
        i_atoms = t.atoms
        per_o, per_i = len(o_atoms) // groups, len(i_atoms) // groups
        for g in range(groups):
            b.cs.together.append(np.concatenate([i_atoms[g * per_i:(g + 1) * per_i], o_atoms[g * per_o:(g + 1) * per_o]]))


def _linear(node: Node, b: TrackBuilder) -> None:
    x, out = node.inputs[0], node.outputs[0]
    t = b.cs.track(x)
    r = rank_of(x)
    if t is not None and r is not None and t.axis != r - 1:
        b.cs.pin(x, f"linear {node.name!r} reads a tracked axis other than its features")
    if out.shape is not None:
        b.fresh(out, len(out.shape) - 1)


def _norm(node: Node, b: TrackBuilder) -> None:
    t = b.cs.track(node.inputs[0])
    r = rank_of(node.inputs[0])
    if t is None or r is None:
        return b.mix(node, "untracked input")
    typ = node.attrs.get("type")
    if typ == "layer":
        start = int(node.attrs.get("axis", -1)) % r
        mixing = t.axis >= start
    elif typ in ("batch", "instance"):
        mixing = False
    else:  # group, lrn: statistics over channel groups / neighbours
        mixing = t.axis == 1
    b.same(node, 0, 0, t.axis)
    if mixing:
        b.cs.links[node.name] = [Link(0, 0, None)]
        b.cs.pin(node.inputs[0], f"{typ} norm {node.name!r}: statistics couple all channels")


def _pool(node: Node, b: TrackBuilder) -> None:
    a = node.attrs
    r = rank_of(node.inputs[0]) or 0
    if a.get("reduce"):
        axes = sorted(int(x) % r for x in a["axes"]) if r else []
        keep = a.get("keepdims", True)
        _unary_pass(node, b, lambda k: None if k in axes else (k if keep else k - sum(1 for x in axes if x < k)))
    else:
        _unary_pass(node, b, lambda k: None if k >= 2 else k)


def _softmax(node: Node, b: TrackBuilder) -> None:
    r = rank_of(node.inputs[0]) or 1
    axis = int(node.attrs.get("axis", -1)) % r
    _unary_pass(node, b, lambda k: None if k == axis else k)


def _output(node: Node, b: TrackBuilder) -> None:
    b.cs.pin(node.inputs[0], "graph output")


def _source(node: Node, b: TrackBuilder) -> None:
    """input, constant: untracked until an operand rule adopts a constant."""


def _matmul(node: Node, b: TrackBuilder) -> None:
    """Two activations, batched alike over a tracked leading axis (attention heads): the operands'
    atoms join and pass to the product; anything else is pinned."""
    if len(node.inputs) != 2:
        return _pin_all(node, b)
    (left, right), out = node.inputs, node.outputs[0]
    tl, tr, r = b.cs.track(left), b.cs.track(right), rank_of(out)
    if tl is None or tr is None or r is None or rank_of(left) != r or rank_of(right) != r or tl.axis != tr.axis \
            or tl.axis >= r - 2 or len(tl.atoms) != len(tr.atoms) or out.shape[tl.axis] != len(tl.atoms):  # type: ignore[index]
        return _pin_all(node, b)
    b.cs.union(tl.atoms, tr.atoms)
    b.set(out, tl.axis, tl.atoms)
    for i in range(2):
        b.link(node, i, 0, np.arange(len(tl.atoms)))


def _pin_all(node: Node, b: TrackBuilder) -> None:
    b.mix(node, "product of activations / fused attention / opaque operator")


def _boundary(node: Node, b: TrackBuilder) -> None:
    """A transposed conv keeps its channels: compaction slices neither its input nor its output."""
    b.mix(node, "transposed conv: its channels are a compaction boundary")


def _opaque(node: Node, b: TrackBuilder) -> None:
    """A resize (``op="resize"``) works per channel on the spatial axes: atoms pass. Any other opaque operator: pinned."""
    if node.attrs.get("op") == "resize":
        return _unary_pass(node, b, lambda k: None if k >= 2 else k)
    _pin_all(node, b)


CouplingRule = Callable[[Node, TrackBuilder], None]

COUPLING_RULES: dict[OpKind, CouplingRule] = {
    OpKind.INPUT: _source,
    OpKind.CONSTANT: _source,
    OpKind.OUTPUT: _output,
    OpKind.CONV: _conv,
    OpKind.CONV_TRANSPOSE: _boundary,
    OpKind.LINEAR: _linear,
    OpKind.ADD: _elementwise,
    OpKind.MUL: _elementwise,
    OpKind.POINTWISE: _elementwise,
    OpKind.NORM: _norm,
    OpKind.POOL: _pool,
    OpKind.SOFTMAX: _softmax,
    OpKind.RESHAPE: reshape_rule,
    OpKind.CONCAT: concat_rule,
    OpKind.SPLIT: split_rule,
    OpKind.MATMUL: _matmul,
    OpKind.ATTENTION: _pin_all,
    OpKind.OPAQUE: _opaque,
}


def channel_spaces(graph: Graph) -> ChannelSpaces:
    """Apply the coupling rule of every node in topological order; pin shared sliced Params."""
    b = TrackBuilder(graph)
    for node in graph.nodes:
        COUPLING_RULES.get(node.kind, _pin_all)(node, b)
    users: dict[object, list[Node]] = {}
    for node in graph.nodes:
        for p in node.params.values():
            users.setdefault(p.storage, []).append(node)
    for node in graph.nodes:
        for p, _, value in param_slices(node, b.cs):
            if len(users[p.storage]) > 1:
                b.cs.pin(value, f"param {p.name!r} is shared by several nodes")
    return b.cs
