"""Matchers shared by the pattern fusers: the pointwise node producing a value, its scalar constant, dead-chain removal.

A constant matches a target when |c - target| <= max(2 eps(dtype) |target| + 1e-12, 2e-7 |target|).
"""
from __future__ import annotations

import math

import numpy as np

from pai_compiler.ir import Graph, Node, OpKind, Value
from pai_compiler.ir.dtypes import float_eps

__all__ = ["const_value", "const_close", "pointwise_of", "remove_dead"]


def pointwise_of(v: Value, op: str) -> Node | None:
    """The pointwise ``op`` node producing ``v``, if that is what produces it."""
    n = v.producer
    if n is not None and n.kind is OpKind.POINTWISE and n.attrs.get("op") == op:
        return n
    return None


def const_value(n: Node) -> float | None:
    """The single value of a pointwise node's constant operand (None unless it has one)."""
    p = n.params.get("const")
    if p is None or p.data.size != 1:
        return None
    try:
        return float(np.asarray(p.data).reshape(-1)[0])
    except (TypeError, ValueError):
        return None


def const_close(n: Node | None, target: float) -> bool:
    """``n``'s constant equals ``target`` up to the rounding of the constant's own dtype."""
    if n is None:
        return False
    c = const_value(n)
    if c is None or not math.isfinite(c):
        return False
    tol = 2 * (float_eps(n.params["const"].data.dtype) or 0.0) * abs(target) + 1e-12
    return abs(c - target) <= max(tol, 2e-7 * abs(target))


def remove_dead(graph: Graph, chain: list[Node]) -> list[Node]:
    """Remove the pattern's nodes that nothing uses any more; return them. A node still used
    outside the pattern stays (and so do its producers)."""
    pending, removed = list(dict.fromkeys(chain)), []
    progress = True
    while pending and progress:
        progress = False
        for n in list(pending):
            if all(not v.uses for v in n.outputs):
                graph.remove_node(n)
                pending.remove(n)
                removed.append(n)
                progress = True
    return removed
