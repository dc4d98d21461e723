"""Channel coupling: which channels must be removed together, as per-OpKind rules.

A value whose channels may be removed gets a **track**: the axis holding its channels and,
per index on that axis, an **atom** id. Channel-wise operators join the atoms of their
operands and result (union-find), so an atom is one channel followed through a chain of
values; removing a channel removes its atom from every value that carries it. Each rule also
records **links** (which input index each output index reads: the same index, an offset, a
repeat, or every index) from which the liveness sweep derives per-channel dependence.

=============  ===========================================================================
kind           rule (``COUPLING_RULES``)
=============  ===========================================================================
conv           output: fresh atoms on axis 1; groups=1 *consumes* the input channels
               (boundary: the weight's in-axis is sliced, constants folded). Depthwise
               (groups = C_in = C_out): output atoms = input atoms (in = out coupling).
               Other grouped convs: fresh atoms, and each group's input + output channels
               form a *together* set: a group goes only whole, so all groups stay equal.
linear         fresh atoms on the last axis; consumes the input's last axis.
add/mul/       elementwise: operands, right-aligned (numpy broadcasting), share atoms on
pointwise      the channel axis; a size-1 (broadcast) operand is read by every channel.
norm           batch/instance: per channel (axis 1), atoms pass, params sliced. layer
               (normalised axes hold the channel axis), group, lrn: the statistics couple
               ALL channels, so removing one changes every output: atoms pinned (kept).
concat/split   along the channel axis: output atoms = the inputs' atoms at offsets (split:
               slices); along another axis: atoms shared.
pool/softmax   over other axes: atoms pass (the axis index moves when dims are dropped);
               over the channel axis: pinned.
reshape        transpose: the axis moves. reshape keeping the channel dim whole (dims
               around it merged or split): pass. Flatten C×S -> features with the channel
               outermost: feature f carries the atom of channel f // S (repeat link).
               gather/slice/pad on another axis: pass. gather of a 1-D index along the
               channel axis (a fused channel shuffle): output atoms = input atoms[index].
               Anything else (expand, unflatten,
               the channel dim split or merged with outer dims): pinned.
constant       a data constant adopts the track of the operand it is combined with.
output         pinned: the model's output shape never changes.
matmul         two activations batched over the same tracked leading axis (attention heads:
               Q·Kᵀ, A·V): atoms join and pass; anything else pinned, result untracked.
attention,     pinned, result untracked (a fused attention op; opaque semantics).
opaque
reshape (heads) splitting the channel dim H·D into (H, D): each head's D channels are one
               atom tracked on the head axis (a head goes whole); merging back is a flatten.
=============  ===========================================================================

``param_slices`` (``SLICE_RULES``) says which Param axis is indexed by which track (the dead-node pass slices
exactly these). A Param used by two nodes is never sliced: its atoms are pinned. A constant an
exporter stored once for equal tensors (BN stats, zero biases) is not such a Param: the ONNX
frontend gives each use its own copy (``Param.per_use_copy``), so only tied weights pin.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from pai_compiler.ir import Dim, Graph, Node, OpKind, Param, Value
from pai_compiler.ir.dims import as_expr, sym

__all__ = ["Track", "Link", "ChannelSpaces", "COUPLING_RULES", "SLICE_RULES", "channel_spaces", "param_slices", "dims_equal"]


@dataclass
class Track:
    """The channel axis of a value and the atom of each index on it."""

    axis: int
    atoms: np.ndarray  # int64, one atom per index (resolve with ChannelSpaces.roots)


class Link(NamedTuple):
    """Output ``output`` index o reads input ``input`` index ``index[o]`` (-1: none); None: all."""

    input: int
    output: int
    index: np.ndarray | None


@dataclass
class ChannelSpaces:
    """Tracks, links and constraints of a graph (see the module docstring)."""

    tracks: dict[str, Track] = field(default_factory=dict)
    links: dict[str, list[Link]] = field(default_factory=dict)
    parent: list[int] = field(default_factory=list)
    pinned: dict[int, str] = field(default_factory=dict)  # atom -> why (resolve with roots)
    together: list[np.ndarray] = field(default_factory=list)

    def new_atoms(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def roots(self, atoms: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(int(a)) for a in atoms), dtype=np.int64, count=len(atoms))

    def pin(self, value: Value | None, reason: str) -> None:
        track = self.tracks.get(value.name) if value is not None else None
        if track is not None:
            for a in track.atoms.tolist():
                self.pinned.setdefault(int(a), reason)

    def pinned_roots(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for a, why in self.pinned.items():
            out.setdefault(self.find(a), why)
        return out

    def track(self, value: Value) -> Track | None:
        return self.tracks.get(value.name)

    def size(self, value: Value) -> int:
        """Length of the value's liveness vector: its channel count, or 1 when untracked."""
        track = self.tracks.get(value.name)
        return 1 if track is None else len(track.atoms)


def dims_equal(a: Dim, b: Dim) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sym().simplify(as_expr(a) - as_expr(b)) == 0


def _prod(dims: tuple[Dim, ...] | list[Dim]) -> Dim:
    out: Dim = 1
    for d in dims:
        out = out * d
    return out


class _Builder:
    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.cs = ChannelSpaces()

    def set(self, value: Value, axis: int, atoms: np.ndarray) -> None:
        self.cs.tracks[value.name] = Track(axis, atoms.astype(np.int64))

    def fresh(self, value: Value, axis: int) -> None:
        shape = value.shape
        if shape is None or not isinstance(shape[axis], int):
            return
        self.set(value, axis, self.cs.new_atoms(int(shape[axis])))

    def link(self, node: Node, i: int, j: int, index: np.ndarray | None) -> None:
        self.cs.links.setdefault(node.name, []).append(Link(i, j, index))

    def adopt(self, value: Value, axis: int) -> Track | None:
        """A data constant takes a track the first time an operand rule asks for one."""
        producer = value.producer
        if producer is None or producer.kind is not OpKind.CONSTANT or value.name in self.cs.tracks:
            return self.cs.track(value)
        self.fresh(value, axis)
        return self.cs.track(value)

    def mix(self, node: Node, reason: str) -> None:
        """Every output element may read every input element: pin inputs, outputs untracked."""
        for v in node.inputs:
            self.cs.pin(v, f"{node.kind.value} {node.name!r}: {reason}")
        for i in range(len(node.inputs)):
            for j in range(len(node.outputs)):
                self.link(node, i, j, None)

    def same(self, node: Node, i: int, j: int, axis: int, *, union: bool = True) -> None:
        """Output j has input i's channels on ``axis`` (index for index)."""
        src = self.cs.tracks[node.inputs[i].name]
        out = node.outputs[j]
        if out.name in self.cs.tracks and union:
            self.cs.union(self.cs.tracks[out.name].atoms, src.atoms)
        else:
            self.set(out, axis, src.atoms)
        self.link(node, i, j, np.arange(len(src.atoms)))


def _rank(v: Value) -> int | None:
    return None if v.shape is None else len(v.shape)


# ---- rules ---------------------------------------------------------------------------------
def _elementwise(node: Node, b: _Builder) -> None:
    """Operands broadcast (right-aligned); full-size operands share atoms on the channel axis."""
    out = node.outputs[0]
    r = _rank(out)
    if r is None or any(_rank(v) is None for v in node.inputs):
        return b.mix(node, "unknown rank")
    axes = {t.axis + r - _rank(v) for v in node.inputs if (t := b.cs.track(v)) is not None}  # type: ignore[operator]
    if len(axes) != 1:
        return b.mix(node, "operands disagree on the channel axis" if axes else "no tracked operand")
    k = axes.pop()
    n = out.shape[k]  # type: ignore[index]
    if not isinstance(n, int):
        return b.mix(node, "symbolic channel count")
    atoms: np.ndarray | None = None
    joined: list[int] = []
    for i, v in enumerate(node.inputs):
        kv = k - (r - _rank(v))  # type: ignore[operator]
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


def _unary_pass(node: Node, b: _Builder, axis_map: Callable[[int], int | None]) -> None:
    """Single-input node: channels pass to output 0 on ``axis_map(axis)`` (None: pin)."""
    t = b.cs.track(node.inputs[0])
    if t is None:
        return b.mix(node, "untracked input")
    k = axis_map(t.axis)
    if k is None:
        return b.mix(node, "mixes the channel axis")
    b.same(node, 0, 0, k)


def _conv(node: Node, b: _Builder) -> None:
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


def _linear(node: Node, b: _Builder) -> None:
    x, out = node.inputs[0], node.outputs[0]
    t = b.cs.track(x)
    r = _rank(x)
    if t is not None and r is not None and t.axis != r - 1:
        b.cs.pin(x, f"linear {node.name!r} reads a tracked axis other than its features")
    if out.shape is not None:
        b.fresh(out, len(out.shape) - 1)


def _norm(node: Node, b: _Builder) -> None:
    t = b.cs.track(node.inputs[0])
    r = _rank(node.inputs[0])
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


def _pool(node: Node, b: _Builder) -> None:
    a = node.attrs
    r = _rank(node.inputs[0]) or 0
    if a.get("reduce"):
        axes = sorted(int(x) % r for x in a["axes"]) if r else []
        keep = a.get("keepdims", True)
        _unary_pass(node, b, lambda k: None if k in axes else (k if keep else k - sum(1 for x in axes if x < k)))
    else:
        _unary_pass(node, b, lambda k: None if k >= 2 else k)


def _softmax(node: Node, b: _Builder) -> None:
    r = _rank(node.inputs[0]) or 1
    axis = int(node.attrs.get("axis", -1)) % r
    _unary_pass(node, b, lambda k: None if k == axis else k)


def _reshape(node: Node, b: _Builder) -> None:
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
    outer = _prod(x.shape[:k])
    n = int(x.shape[k])
    for j in range(len(out.shape)):
        if not dims_equal(_prod(out.shape[:j]), outer):
            continue
        if dims_equal(out.shape[j], n):
            return b.same(node, 0, 0, j)
        for m in range(k + 2, len(x.shape) + 1):  # flatten: channel outermost of the merged dims
            inner = _prod(x.shape[k + 1:m])
            if isinstance(inner, int) and dims_equal(out.shape[j], n * inner):
                b.set(out, j, np.repeat(t.atoms, inner))
                b.link(node, 0, 0, np.repeat(np.arange(n), inner))
                return
    if _split_heads(node, b, t, outer, n):
        return
    b.mix(node, "reshape splits or merges the channel dim")


def _split_heads(node: Node, b: _Builder, t: Track, outer: Dim, n: int) -> bool:
    """(…, H·D, rest) -> (…, H, D, rest): each head's D channels become one atom, tracked on the
    head axis (they go together: a whole attention head, or a whole channel group)."""
    x, out = node.inputs[0], node.outputs[0]
    assert x.shape is not None and out.shape is not None
    rest = _prod(x.shape[t.axis + 1:])
    for j in range(len(out.shape) - 1):
        heads, width = out.shape[j], out.shape[j + 1]
        if not (isinstance(heads, int) and isinstance(width, int)) or heads * width != n or heads < 2 or width < 2:
            continue
        if dims_equal(_prod(out.shape[:j]), outer) and dims_equal(_prod(out.shape[j + 2:]), rest):
            for h in range(heads):
                b.cs.union(np.full(width, t.atoms[h * width]), t.atoms[h * width:(h + 1) * width])
            b.set(out, j, t.atoms[::width].copy())
            for d in range(width):
                b.link(node, 0, 0, np.arange(heads) * width + d)
            return True
    return False


def _concat(node: Node, b: _Builder) -> None:
    out = node.outputs[0]
    r = _rank(out)
    axis = int(node.attrs["axis"])
    tracked = [t.axis for v in node.inputs if (t := b.cs.track(v)) is not None]
    if r is None or not tracked or len(set(tracked)) != 1 or any(_rank(v) != r for v in node.inputs):
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


def _elementwise_same_rank(node: Node, b: _Builder, k: int) -> None:
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


def _split(node: Node, b: _Builder) -> None:
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


def _output(node: Node, b: _Builder) -> None:
    b.cs.pin(node.inputs[0], "graph output")


def _source(node: Node, b: _Builder) -> None:
    """input, constant: untracked until an operand rule adopts a constant."""


def _matmul(node: Node, b: _Builder) -> None:
    """Two activations, batched alike over a tracked leading axis (attention heads): the operands'
    atoms join and pass to the product; anything else is pinned."""
    if len(node.inputs) != 2:
        return _pin_all(node, b)
    (left, right), out = node.inputs, node.outputs[0]
    tl, tr, r = b.cs.track(left), b.cs.track(right), _rank(out)
    if tl is None or tr is None or r is None or _rank(left) != r or _rank(right) != r or tl.axis != tr.axis \
            or tl.axis >= r - 2 or len(tl.atoms) != len(tr.atoms) or out.shape[tl.axis] != len(tl.atoms):  # type: ignore[index]
        return _pin_all(node, b)
    b.cs.union(tl.atoms, tr.atoms)
    b.set(out, tl.axis, tl.atoms)
    for i in range(2):
        b.link(node, i, 0, np.arange(len(tl.atoms)))


def _pin_all(node: Node, b: _Builder) -> None:
    b.mix(node, "product of activations / fused attention / opaque operator")


CouplingRule = Callable[[Node, _Builder], None]

COUPLING_RULES: dict[OpKind, CouplingRule] = {
    OpKind.INPUT: _source,
    OpKind.CONSTANT: _source,
    OpKind.OUTPUT: _output,
    OpKind.CONV: _conv,
    OpKind.LINEAR: _linear,
    OpKind.ADD: _elementwise,
    OpKind.MUL: _elementwise,
    OpKind.POINTWISE: _elementwise,
    OpKind.NORM: _norm,
    OpKind.POOL: _pool,
    OpKind.SOFTMAX: _softmax,
    OpKind.RESHAPE: _reshape,
    OpKind.CONCAT: _concat,
    OpKind.SPLIT: _split,
    OpKind.MATMUL: _matmul,
    OpKind.ATTENTION: _pin_all,
    OpKind.OPAQUE: _pin_all,
}


def channel_spaces(graph: Graph) -> ChannelSpaces:
    """Apply the coupling rule of every node in topological order; pin shared sliced Params."""
    b = _Builder(graph)
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
    consumed = 1 if node.kind is OpKind.CONV else (_rank(x) or 0) - 1
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
    t, r = cs.track(y), _rank(y)
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
    """No Param to slice: the node has none, or its channels are pinned (matmul, attention, opaque)."""
    return []


#: which Param axes follow which value's channels, per op kind
SLICE_RULES: dict[OpKind, SliceRule] = {
    OpKind.CONV: _weighted_slices,
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
