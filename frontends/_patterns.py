"""Frontend fusions: recognise decomposed activations and make them one pointwise node.

Exporters spell GELU as ``x * (1 + erf(x / sqrt 2))`` (then ``* 0.5``) and SiLU as
``x * sigmoid(x)``. Left alone, the ``Mul`` of two activations would *multiply* path counts;
fused, the activation is the unary pointwise op it is (``gelu`` with ``scale=2`` for the
former: 2*gelu(x) = x*(1+erf(x/sqrt 2)); ``silu`` for the latter).
"""
from __future__ import annotations

import math

import numpy as np

from pai_compiler.ir import Graph, Node, OpKind, Value

__all__ = ["fuse_patterns"]


def _pointwise(v: Value, op: str) -> Node | None:
    n = v.producer
    if n is not None and n.kind is OpKind.POINTWISE and n.attrs.get("op") == op:
        return n
    return None


def _const_value(n: Node) -> float | None:
    p = n.params.get("const")
    if p is None or p.data.size != 1:
        return None
    return float(np.asarray(p.data).reshape(-1)[0])


def _match_erf_gelu(x: Value, t: Value) -> list[Node] | None:
    add = _pointwise(t, "add")
    if add is None or _const_value(add) != 1.0:
        return None
    erf = _pointwise(add.inputs[0], "erf")
    if erf is None:
        return None
    scale = erf.inputs[0].producer
    if scale is None or scale.kind is not OpKind.POINTWISE or scale.inputs[0] is not x or scale.attrs.get("const_first"):
        return None
    c = _const_value(scale)
    if c is None:
        return None
    ok = (scale.attrs["op"] == "div" and abs(c - math.sqrt(2)) < 1e-4) or (scale.attrs["op"] == "mul" and abs(c - 1 / math.sqrt(2)) < 1e-4)
    return [add, erf, scale] if ok else None


def _replace(graph: Graph, mul: Node, x: Value, op: str, attrs: dict[str, object], chain: list[Node]) -> None:
    out = mul.outputs[0]
    fused = graph.add_node(OpKind.POINTWISE, graph.fresh_name(f"{mul.name}_{op}"), [x],
                           [(graph.fresh_name(out.name + f"_{op}"), out.shape, out.dtype)],
                           attrs={"op": op, **attrs}, origin=mul.origin, before=mul)
    graph.replace_all_uses(out, fused.outputs[0])
    graph.remove_node(mul)
    for n in chain:  # producers first used only by the pattern
        if all(not v.uses for v in n.outputs):
            graph.remove_node(n)


def fuse_patterns(graph: Graph) -> int:
    """Fuse GELU/SiLU spelled out of primitives; return how many were fused."""
    fused = 0
    for mul in list(graph.nodes):
        if mul.kind is not OpKind.MUL or mul.attrs.get("op") != "mul" or len(mul.inputs) != 2:
            continue
        a, b = mul.inputs
        for x, t in ((a, b), (b, a)):
            sig = _pointwise(t, "sigmoid")
            if sig is not None and sig.inputs[0] is x:
                _replace(graph, mul, x, "silu", {}, [sig])
                fused += 1
                break
            chain = _match_erf_gelu(x, t)
            if chain is not None:
                _replace(graph, mul, x, "gelu", {"approximate": "none", "scale": 2.0}, chain)
                fused += 1
                break
    return fused
