"""Which Param axis follows which value's channels, per OpKind (``SLICE_RULES``, ``param_slices``).

Conv/linear: the weight's out axis (and the bias) with the output's channels, its in axis with
the input's (groups = 1); batch/instance norm: its per-channel vectors; a broadcast constant:
the axis that lines up with the output's channels. The dead-node pass slices exactly these.
"""
from __future__ import annotations

from collections.abc import Callable

from pai_compiler.ir import Node, OpKind, Param, Value
from pai_compiler.passes.analysis.coupling.tracks import ChannelSpaces, rank_of

__all__ = ["ParamSlice", "SliceRule", "SLICE_RULES", "param_slices"]


ParamSlice = tuple[Param, int, Value]
SliceRule = Callable[[Node, ChannelSpaces], list[ParamSlice]]


def _weighted_slices(node: Node, cs: ChannelSpaces) -> list[ParamSlice]:
    """Conv/linear: the weight's (and bias's) out axis with the output's channels, its in axis with the input's."""
    out: list[ParamSlice] = []
    x, y = node.inputs[0], node.outputs[0]
    ty, tx = cs.track(y), cs.track(x)
    w = node.params["weight"]
    if ty is not None and (node.kind is OpKind.LINEAR or ty.axis == 1):
        out.append((w, w.out_axis, y))
        if "bias" in node.params:
            out.append((node.params["bias"], 0, y))
    consumed = 1 if node.kind is OpKind.CONV else (rank_of(x) or 0) - 1
    if tx is not None and tx.axis == consumed and w.in_axis is not None and int(node.attrs.get("groups", 1)) == 1:
        out.append((w, w.in_axis, x))
    return out


def _norm_slices(node: Node, cs: ChannelSpaces) -> list[ParamSlice]:
    """Batch/instance norm: its per-channel vectors with the input's channels."""
    t = cs.track(node.inputs[0])
    if t is None or t.axis != 1 or node.attrs.get("type") not in ("batch", "instance"):
        return []
    n = len(t.atoms)
    return [(p, 0, node.inputs[0]) for p in node.params.values() if p.data.ndim == 1 and p.shape[0] == n and n != 1]


def _broadcast_slices(node: Node, cs: ChannelSpaces) -> list[ParamSlice]:
    """A constant operand broadcast against the output: its axis that lines up with the output's channels."""
    if not node.outputs:
        return []
    y = node.outputs[0]
    t, r = cs.track(y), rank_of(y)
    if t is None or r is None:
        return []
    n = len(t.atoms)
    out: list[ParamSlice] = []
    for p in node.params.values():
        pa = t.axis - (r - p.data.ndim)
        if 0 <= pa < p.data.ndim and p.shape[pa] == n and n != 1:
            out.append((p, pa, y))
    return out


def _no_slices(node: Node, cs: ChannelSpaces) -> list[ParamSlice]:
    """No Param to slice: the node has none, or its channels are pinned (matmul, attention, transposed conv, opaque)."""
    return []


#: which Param axes follow which value's channels, per op kind
SLICE_RULES: dict[OpKind, SliceRule] = {
    OpKind.CONV: _weighted_slices,
    OpKind.CONV_TRANSPOSE: _no_slices,
    OpKind.LINEAR: _weighted_slices,
    OpKind.NORM: _norm_slices,
    OpKind.POINTWISE: _broadcast_slices,
    OpKind.CONSTANT: _broadcast_slices,
    OpKind.ADD: _broadcast_slices,
    OpKind.MUL: _broadcast_slices,
    OpKind.INPUT: _no_slices,
    OpKind.OUTPUT: _no_slices,
    OpKind.POOL: _no_slices,
    OpKind.SOFTMAX: _no_slices,
    OpKind.RESHAPE: _no_slices,
    OpKind.CONCAT: _no_slices,
    OpKind.SPLIT: _no_slices,
    OpKind.MATMUL: _no_slices,
    OpKind.ATTENTION: _no_slices,
    OpKind.OPAQUE: _no_slices,
}


def param_slices(node: Node, cs: ChannelSpaces) -> list[ParamSlice]:
    """(param, param axis, value whose track indexes that axis) for every sliceable Param."""
    return SLICE_RULES[node.kind](node, cs)
