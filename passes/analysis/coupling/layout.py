"""Coupling rules of the layout ops: reshape/transpose/gather/slice/pad, concat and split.

Channels pass when the op keeps the channel dim whole (its axis may move); a flatten with the
channel outermost repeats each atom over the merged dims; a split of H·D into (H, D) tracks one
atom per head; concat/split along the channel axis place the operands' atoms at offsets.
Anything else pins (``TrackBuilder.mix``).
"""
from __future__ import annotations

import numpy as np

from pai_compiler.ir import Dim, Node
from pai_compiler.passes.analysis.coupling.tracks import Track, TrackBuilder, dims_equal, prod_dims, rank_of

__all__ = ["reshape_rule", "concat_rule", "split_rule"]


def reshape_rule(node: Node, b: TrackBuilder) -> None:
    a = node.attrs
    x, out = node.inputs[0], node.outputs[0]
    t = b.cs.track(x)
    op = a.get("op")
    if t is None or x.shape is None or out.shape is None:
        return b.mix(node, "untracked input or unknown shape")
    k = t.axis
    if op == "transpose":
        return b.same(node, 0, 0, list(a["perm"]).index(k))
    if op == "gather":
        if a["axis"] == k and len(a.get("indices_shape", [])) == 1:  # picks/permutes channels
            index = np.asarray(a["indices"], dtype=np.int64) % len(t.atoms)
            b.set(out, k, t.atoms[index])
            b.link(node, 0, 0, index)
            return
        if a["axis"] == k:
            return b.mix(node, "gathers along the channel axis")
        return b.same(node, 0, 0, k if k < a["axis"] else k - 1 + len(a.get("indices_shape", [])))
    if op == "slice":
        full = all(ax != k or (st == 0 and sp == 1 and en >= int(x.shape[k])) for st, en, ax, sp in zip(a["starts"], a["ends"], a["axes"], a["steps"]))
        return b.same(node, 0, 0, k) if full else b.mix(node, "slices the channel axis")
    if op == "pad":
        pads = a["pads"]
        return b.same(node, 0, 0, k) if pads[k] == 0 and pads[k + len(x.shape)] == 0 else b.mix(node, "pads the channel axis")
    if op != "reshape":
        return b.mix(node, f"{op} is not channel-transparent")
    outer = prod_dims(x.shape[:k])
    n = int(x.shape[k])
    for j in range(len(out.shape)):
        if not dims_equal(prod_dims(out.shape[:j]), outer):
            continue
        if dims_equal(out.shape[j], n):
            return b.same(node, 0, 0, j)
        for m in range(k + 2, len(x.shape) + 1):  # flatten: channel outermost of the merged dims
            inner = prod_dims(x.shape[k + 1:m])
            if isinstance(inner, int) and dims_equal(out.shape[j], n * inner):
                b.set(out, j, np.repeat(t.atoms, inner))
                b.link(node, 0, 0, np.repeat(np.arange(n), inner))
                return
    if _split_heads(node, b, t, outer, n):
        return
    b.mix(node, "reshape splits or merges the channel dim")


def _split_heads(node: Node, b: TrackBuilder, t: Track, outer: Dim, n: int) -> bool:
    """(…, H·D, rest) -> (…, H, D, rest): each head's D channels become one atom, tracked on the
    head axis (they go together: a whole attention head, or a whole channel group)."""
    x, out = node.inputs[0], node.outputs[0]
    assert x.shape is not None and out.shape is not None
    rest = prod_dims(x.shape[t.axis + 1:])
    for j in range(len(out.shape) - 1):
        heads, width = out.shape[j], out.shape[j + 1]
        if not (isinstance(heads, int) and isinstance(width, int)) or heads * width != n or heads < 2 or width < 2:
            continue
        if dims_equal(prod_dims(out.shape[:j]), outer) and dims_equal(prod_dims(out.shape[j + 2:]), rest):
            for h in range(heads):
                b.cs.union(np.full(width, t.atoms[h * width]), t.atoms[h * width:(h + 1) * width])
            b.set(out, j, t.atoms[::width].copy())
            for d in range(width):
                b.link(node, 0, 0, np.arange(heads) * width + d)
            return True
    return False


def concat_rule(node: Node, b: TrackBuilder) -> None:
    out = node.outputs[0]
    r = rank_of(out)
    axis = int(node.attrs["axis"])
    tracked = [t.axis for v in node.inputs if (t := b.cs.track(v)) is not None]
    if r is None or not tracked or len(set(tracked)) != 1 or any(rank_of(v) != r for v in node.inputs):
        return b.mix(node, "operands not tracked on one axis")
    k = tracked[0]
    if k != axis:
        return _elementwise_same_rank(node, b, k)
    parts = []
    for v in node.inputs:
        t = b.adopt(v, k)
        if t is None or t.axis != k:
            return b.mix(node, f"operand {v.name!r} is not channel-tracked")
        parts.append(t.atoms)
    b.set(out, k, np.concatenate(parts))
    offset = 0
    total = sum(len(p) for p in parts)
    for i, p in enumerate(parts):
        index = np.full(total, -1, dtype=np.int64)
        index[offset:offset + len(p)] = np.arange(len(p))
        b.link(node, i, 0, index)
        offset += len(p)


def _elementwise_same_rank(node: Node, b: TrackBuilder, k: int) -> None:
    atoms: np.ndarray | None = None
    for v in node.inputs:
        t = b.adopt(v, k)
        if t is None or t.axis != k or (atoms is not None and len(t.atoms) != len(atoms)):
            return b.mix(node, f"operand {v.name!r} is not channel-tracked")
        if atoms is None:
            atoms = t.atoms
        else:
            b.cs.union(atoms, t.atoms)
    assert atoms is not None
    b.set(node.outputs[0], k, atoms)
    for i in range(len(node.inputs)):
        b.link(node, i, 0, np.arange(len(atoms)))


def split_rule(node: Node, b: TrackBuilder) -> None:
    t = b.cs.track(node.inputs[0])
    if t is None:
        return b.mix(node, "untracked input")
    if int(node.attrs["axis"]) != t.axis:
        for j in range(len(node.outputs)):
            b.same(node, 0, j, t.axis)
        return
    offset = 0
    for j, size in enumerate(node.attrs["sizes"]):
        b.set(node.outputs[j], t.axis, t.atoms[offset:offset + int(size)])
        b.link(node, 0, j, np.arange(offset, offset + int(size)))
        offset += int(size)
