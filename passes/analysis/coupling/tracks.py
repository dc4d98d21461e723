"""Channel tracks: per value, the channel axis and one union-find **atom** per channel index,
plus the **links** (output index o reads input index ``index[o]``) the coupling rules record.

``ChannelSpaces`` holds the result (tracks, links, pinned atoms, together-sets);
``TrackBuilder`` is what a coupling rule writes through (fresh atoms, shared atoms, links, pins).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from pai_compiler.ir import Dim, Graph, Node, OpKind, Value
from pai_compiler.ir.dims import as_expr, sym

__all__ = ["Track", "Link", "ChannelSpaces", "TrackBuilder", "dims_equal", "prod_dims", "rank_of"]


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
    """Two dims are equal as numbers or as simplified symbolic expressions."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sym().simplify(as_expr(a) - as_expr(b)) == 0


def prod_dims(dims: tuple[Dim, ...] | list[Dim]) -> Dim:
    """The product of (possibly symbolic) dims; 1 for none."""
    out: Dim = 1
    for d in dims:
        out = out * d
    return out


class TrackBuilder:
    """The ``ChannelSpaces`` under construction, with the operations the coupling rules use."""

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


def rank_of(v: Value) -> int | None:
    """The value's rank, None when its shape is unknown."""
    return None if v.shape is None else len(v.shape)
