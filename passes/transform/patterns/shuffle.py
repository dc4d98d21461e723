"""Channel permutations spelled as data movement -> one ``gather`` along the permuted axis.

ShuffleNet's channel shuffle is ``reshape (N, C, H, W) -> (N, g, C/g, H, W)``, ``transpose``
of the two channel factors, ``reshape`` back to ``(N, C, H, W)``: together a permutation P of
the channel axis, ``y = x[:, P]``. Left as three nodes, the middle value's channels span two
axes and channel coupling must pin them; as ``reshape{op=gather, axis=1, indices=P}`` every
channel is followed through it, so compaction removes channels on both sides (the gather's
indices shrink with them).

A chain of reshape/transpose nodes (each the only use of the one before, starting and ending
on the same shape) is fused when it is a pure permutation along one axis for every size of
its symbolic dims: it is evaluated on ``arange`` index tensors with each symbol bound to 2 and
to 3, and both results must be ``take(index, P, axis)`` with the same P. The fused node keeps
the last node's ONNX origin, and ``replaces`` names the value the chain produced in the source
model: the compact backend writes a Gather there once channels are removed.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pai_compiler.ir import Dim, Graph, Node, OpKind, Value
from pai_compiler.ir.dims import as_expr
from pai_compiler.passes.transform.patterns.match import remove_dead

__all__ = ["fuse_channel_permutations", "permutation_along"]

_MOVES = ("reshape", "transpose")


def _concrete(shape: tuple[Dim, ...], size: int) -> tuple[int, ...] | None:
    out = []
    for d in shape:
        value = d if isinstance(d, int) else as_expr(d).xreplace({s: size for s in as_expr(d).free_symbols})
        if not (isinstance(value, int) or getattr(value, "is_Integer", False)):
            return None
        out.append(int(value))
    return tuple(out)


def _run_chain(chain: list[Node], size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(index tensor of the chain's input, what the chain makes of it) with every symbol = ``size``."""
    shape = _concrete(chain[0].inputs[0].shape or (), size)
    if shape is None or int(np.prod(shape)) > 1 << 22:
        return None
    index = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    y = index
    for node in chain:
        if node.attrs["op"] == "transpose":
            if len(node.attrs["perm"]) != y.ndim:
                return None
            y = np.transpose(y, node.attrs["perm"])
        else:
            target = _concrete(node.outputs[0].shape or (), size)
            # sizes that disagree at this binding (a symbol standing for a product, a shape the
            # exporter left unknown): not provably a permutation, so the chain stays as it is
            if target is None or int(np.prod(target)) != y.size:
                return None
            y = y.reshape(target)
    return index, y


def permutation_along(index: np.ndarray, moved: np.ndarray) -> tuple[int, np.ndarray] | None:
    """(axis, P) with ``moved == take(index, P, axis)`` and P a permutation that moves something."""
    if moved.shape != index.shape:
        return None
    strides = [int(np.prod(index.shape[k + 1:])) for k in range(index.ndim)]
    for axis, n in enumerate(index.shape):
        if n < 2:
            continue
        line = moved[tuple(slice(None) if k == axis else 0 for k in range(index.ndim))]
        perm = (line // strides[axis]) % n
        if np.array_equal(np.sort(perm), np.arange(n)) and not np.array_equal(perm, np.arange(n)) \
                and np.array_equal(np.take(index, perm, axis=axis), moved):
            return axis, perm
    return None


def _chain_from(node: Node) -> list[Node]:
    """The longest run of single-use reshape/transpose nodes starting at ``node``."""
    chain = [node]
    while len(chain[-1].outputs[0].uses) == 1:
        nxt = chain[-1].outputs[0].uses[0]
        if nxt.kind is not OpKind.RESHAPE or nxt.attrs.get("op") not in _MOVES or nxt.outputs[0] in chain[-1].inputs:
            break
        chain.append(nxt)
    return chain


def _fuse(graph: Graph, chain: list[Node], axis: int, perm: np.ndarray) -> None:
    last = chain[-1]
    out: Value = last.outputs[0]
    fused = graph.add_node(
        OpKind.RESHAPE, graph.fresh_name(f"{last.name}_permutation"), [chain[0].inputs[0]],
        [(graph.fresh_name(out.name + "_permuted"), out.shape, out.dtype)],
        attrs={"op": "gather", "axis": axis, "indices": perm.tolist(), "indices_shape": [len(perm)],
               "replaces": out.name},
        origin=last.origin, before=last)
    graph.replace_all_uses(out, fused.outputs[0])
    remove_dead(graph, list(reversed(chain)))


def fuse_channel_permutations(graph: Graph) -> int:
    """Fuse every reshape/transpose chain that permutes one axis; return how many were fused."""
    fused = 0
    done: set[int] = set()
    for node in list(graph.nodes):
        if id(node) in done or node.kind is not OpKind.RESHAPE or node.attrs.get("op") not in _MOVES or node.inputs[0].shape is None:
            continue
        chain = _chain_from(node)
        done.update(id(n) for n in chain)
        for end in range(len(chain), 1, -1):  # the longest prefix that is a permutation
            found = _permutation(chain[:end])
            if found is not None:
                _fuse(graph, chain[:end], *found)
                fused += 1
                break
    return fused


def _permutation(chain: list[Node]) -> tuple[int, np.ndarray] | None:
    if chain[-1].outputs[0].shape is None or len(chain[-1].outputs[0].shape or ()) != len(chain[0].inputs[0].shape or ()):
        return None
    results: list[Any] = []
    for size in (2, 3):
        run = _run_chain(chain, size)
        found = None if run is None else permutation_along(*run)
        if found is None:
            return None
        results.append(found)
    (axis, perm), (axis2, perm2) = results
    return (axis, perm) if axis == axis2 and np.array_equal(perm, perm2) else None
