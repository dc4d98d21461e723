"""Channel liveness: per tracked channel, F (its value depends on the model input) and B (it influences the output).

Both sweeps run at channel granularity over the coupling links, conv/linear through the kept
(out, in) pairs of their masks. Every rule over-approximates real dependence (a kept weight is
assumed to carry it), so a channel found ¬F or ¬B is dead.
"""
from __future__ import annotations

import numpy as np

from pai_compiler.ir import Graph, Node, OpKind
from pai_compiler.passes.analysis.coupling import ChannelSpaces

__all__ = ["WEIGHTED", "connectivity", "reads_track", "channel_liveness"]

WEIGHTED = (OpKind.CONV, OpKind.LINEAR)


def connectivity(node: Node, cs: ChannelSpaces) -> np.ndarray:
    """(len y, len x) bool: output index o reads input index i through a kept weight."""
    w = node.params["weight"]
    oi = w.to_oi(w.mask_or_ones() if w.prunable else w.data != 0)  # a dense layer is tightened by zeroing its weights
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


def reads_track(node: Node, cs: ChannelSpaces) -> bool:
    """Is the conv/linear input tracked on the axis the layer reduces (its in-channels)?"""
    x = node.inputs[0]
    t = cs.track(x)
    if t is None or x.shape is None:
        return False
    return t.axis == (1 if node.kind is OpKind.CONV else len(x.shape) - 1)


def channel_liveness(graph: Graph, cs: ChannelSpaces) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(F, B) per value: bool vectors over its tracked channels (length 1 when untracked)."""
    forward, connections = _forward(graph, cs)
    return forward, _backward(graph, cs, forward, connections)


def _forward(graph: Graph, cs: ChannelSpaces) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """F per value, and each conv/linear's connectivity (reused by the backward sweep)."""
    fwd: dict[str, np.ndarray] = {}
    conns: dict[str, np.ndarray] = {}
    for node in graph.nodes:
        if node.kind is OpKind.OUTPUT:
            continue
        if node.kind in (OpKind.INPUT, OpKind.CONSTANT):
            for v in node.outputs:
                fwd[v.name] = np.full(cs.size(v), node.kind is OpKind.INPUT)
            continue
        if node.kind in WEIGHTED:
            conn = conns[node.name] = connectivity(node, cs)
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
    return fwd, conns


def _backward(graph: Graph, cs: ChannelSpaces, fwd: dict[str, np.ndarray], conns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """B per value: swept from the outputs back through the links and kept weights."""
    bwd = {name: np.zeros(len(f), dtype=bool) for name, f in fwd.items()}
    for node in reversed(graph.nodes):
        if node.kind is OpKind.OUTPUT:
            bwd[node.inputs[0].name][:] = True
        elif node.kind in WEIGHTED:
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
    return bwd
