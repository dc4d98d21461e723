"""Activation fusions: recognise decomposed activations (and, via ``fuse_patterns``, norms and shuffles) and make them one node.

Exporters spell activations out of primitives; left alone, the ``Mul`` of two activations
would *multiply* path counts (the gate rule), so each pattern below becomes the unary node it
is. Every constant is checked to the precision of its dtype, every branch must start from
the same value ``x``; anything else is left untouched.

* erf GELU ``x * (1 + erf(x / sqrt 2))`` -> ``gelu{approximate=none, scale=2}``
  (2*gelu(x) = x*(1+erf(x/sqrt 2))); with the ``0.5`` inside (``x * (0.5 * (1 + erf))``,
  the dynamo exporter) or right after (the TorchScript exporter) -> ``scale=1``.
* tanh GELU ``x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`` (``x^3`` as ``Pow(x, 3)``
  or ``x * (x * x)``) -> ``gelu{approximate=tanh}``, the same node ONNX's ``Gelu`` (opset 20)
  becomes; the ``0.5`` is folded the same way, also as ``(0.5 * x) * (1 + ...)`` (the
  hand-written "gelu_new" of many transformer codebases).
* SiLU ``x * sigmoid(x)`` -> ``silu``; Mish ``x * tanh(softplus(x))`` -> ``mish``;
  HardSwish ``x * HardSigmoid(x; alpha=1/6, beta=0.5)`` -> ``hardswish``.
* LayerNorm spelled with ReduceMean/Sub/Pow/Sqrt/Div (opset < 17) -> ``norm{type=layer}``,
  see ``layer_norm``. Channel shuffles (reshape/transpose chains that permute one axis) ->
  ``reshape{op=gather}``, see ``shuffle``. The matchers all use live in ``match``.
"""
from __future__ import annotations

import math

from pai_compiler.ir import Graph, Node, OpKind, Value
from pai_compiler.passes.transform.patterns.layer_norm import fuse_layer_norms
from pai_compiler.passes.transform.patterns.match import const_close, pointwise_of, remove_dead
from pai_compiler.passes.transform.patterns.shuffle import fuse_channel_permutations

__all__ = ["fuse_patterns", "fuse_activations"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _scaled(t: Value, x: Value) -> tuple[Value, float, list[Node]]:
    """Strip an optional ``0.5 *`` from ``t``: (inner value, its scale, nodes stripped)."""
    half = pointwise_of(t, "mul")
    if half is not None and const_close(half, 0.5) and half.inputs[0] is not x:
        return half.inputs[0], 1.0, [half]
    return t, 2.0, []


def _one_plus(t: Value, x: Value, op: str) -> tuple[list[Node], float, Node] | None:
    """``t`` is ``[0.5 *] (1 + op(...))``, GELU's outer half: (nodes matched, scale, the ``op`` node)."""
    inner, scale, chain = _scaled(t, x)
    add = pointwise_of(inner, "add")
    if add is None or not const_close(add, 1.0):
        return None
    f = pointwise_of(add.inputs[0], op)
    return None if f is None else ([*chain, add], scale, f)


def _match_erf_gelu(x: Value, t: Value) -> tuple[list[Node], dict[str, object]] | None:
    outer = _one_plus(t, x, "erf")
    if outer is None:
        return None
    chain, scale, erf = outer
    arg = erf.inputs[0].producer
    if arg is None or arg.kind is not OpKind.POINTWISE or arg.inputs[0] is not x or arg.attrs.get("const_first"):
        return None
    ok = (arg.attrs["op"] == "div" and const_close(arg, math.sqrt(2))) or (arg.attrs["op"] == "mul" and const_close(arg, 1 / math.sqrt(2)))
    if not ok:
        return None
    return [*chain, erf, arg], {"approximate": "none", "scale": scale}


def _is_cube(v: Value, x: Value) -> list[Node] | None:
    """``v`` is ``x**3`` as ``Pow(x, 3)``, ``x * (x * x)`` or ``(x * x) * x``."""
    pw = pointwise_of(v, "pow")
    if pw is not None and pw.inputs[0] is x and not pw.attrs.get("const_first") and const_close(pw, 3.0):
        return [pw]
    n = v.producer
    if n is None or n.kind is not OpKind.MUL or n.attrs.get("op") != "mul" or len(n.inputs) != 2:
        return None
    for a, b in (n.inputs, n.inputs[::-1]):
        sq = b.producer
        if a is x and sq is not None and sq.kind is OpKind.MUL and sq.attrs.get("op") == "mul" and list(sq.inputs) == [x, x]:
            return [n, sq]
    return None


def _match_tanh_gelu(x: Value, t: Value) -> tuple[list[Node], dict[str, object]] | None:
    outer = _one_plus(t, x, "tanh")
    if outer is None:
        return None
    chain, scale, tanh = outer
    k = pointwise_of(tanh.inputs[0], "mul")
    if k is None or not const_close(k, _SQRT_2_OVER_PI):
        return None
    s = k.inputs[0].producer  # x + 0.044715 * x^3
    if s is None or s.kind is not OpKind.ADD or s.attrs.get("op") != "add" or len(s.inputs) != 2 or x not in s.inputs:
        return None
    other = s.inputs[1] if s.inputs[0] is x else s.inputs[0]
    c = pointwise_of(other, "mul")
    if c is None or not const_close(c, 0.044715):
        return None
    cube = _is_cube(c.inputs[0], x)
    if cube is None:
        return None
    return [*chain, tanh, k, s, c, *cube], {"approximate": "tanh", "scale": scale}


def _match_gelu(a: Value, t: Value) -> tuple[Value, list[Node], dict[str, object]] | None:
    """Either GELU as ``a * t``, with ``a`` being ``x`` or ``0.5 * x`` (``0.5 * x * (1 + ...)``)."""
    for match in (_match_erf_gelu, _match_tanh_gelu):
        found = match(a, t)
        if found is not None:
            return a, found[0], found[1]
    half = pointwise_of(a, "mul")
    if half is None or not const_close(half, 0.5):
        return None
    x = half.inputs[0]
    for match in (_match_erf_gelu, _match_tanh_gelu):
        found = match(x, t)
        if found is not None and found[1]["scale"] == 2.0:
            return x, [*found[0], half], {**found[1], "scale": 1.0}
    return None


def _match_unary(x: Value, t: Value) -> tuple[str, list[Node], dict[str, object]] | None:
    """SiLU, Mish and HardSwish: ``x * f(x)`` with ``f`` one or two pointwise nodes."""
    sig = pointwise_of(t, "sigmoid")
    if sig is not None and sig.inputs[0] is x:
        return "silu", [sig], {}
    tanh = pointwise_of(t, "tanh")
    soft = pointwise_of(tanh.inputs[0], "softplus") if tanh is not None else None
    if soft is not None and soft.inputs[0] is x:
        return "mish", [tanh, soft], {}
    hs = pointwise_of(t, "hardsigmoid")
    if hs is not None and hs.inputs[0] is x:
        alpha, beta = float(hs.attrs.get("alpha", 0.2)), float(hs.attrs.get("beta", 0.5))
        if abs(alpha - 1 / 6) <= 1e-7 and beta == 0.5:
            return "hardswish", [hs], {}
    return None


def _replace(graph: Graph, mul: Node, x: Value, op: str, attrs: dict[str, object], chain: list[Node]) -> list[Node]:
    out = mul.outputs[0]
    attrs = dict(attrs)
    last = mul
    users = out.uses
    if op == "gelu" and attrs.get("scale") == 2.0 and len(users) == 1 and users[0].kind is OpKind.POINTWISE \
            and users[0].attrs.get("op") == "mul" and const_close(users[0], 0.5):
        last = users[0]  # 0.5 * (x * (1 + ...)): fold the half into the node
        attrs["scale"] = 1.0
    if attrs.get("scale") == 1.0:
        del attrs["scale"]  # the plain op, exactly what ONNX's Gelu lowers to
    final = last.outputs[0]
    fused = graph.add_node(OpKind.POINTWISE, graph.fresh_name(f"{mul.name}_{op}"), [x],
                           [(graph.fresh_name(final.name + f"_{op}"), final.shape, final.dtype)],
                           attrs={"op": op, **attrs}, origin=last.origin, before=last)
    graph.replace_all_uses(final, fused.outputs[0])
    return remove_dead(graph, [last, mul, *chain])


def fuse_patterns(graph: Graph) -> int:
    """Fuse activations, LayerNorms and channel shuffles spelled out of primitives; return how many were fused."""
    return fuse_layer_norms(graph) + fuse_channel_permutations(graph) + fuse_activations(graph)


def fuse_activations(graph: Graph) -> int:
    """Fuse GELU, SiLU, Mish and HardSwish spelled out of primitives; return how many were fused.

    Both frontends run it (torch.export and fx spell out hand-written activations such as GPT-2's
    ``gelu_new`` just as ONNX exporters do), so both routes count the same paths."""
    fused = 0
    removed: set[int] = set()
    for mul in graph.nodes:
        if id(mul) in removed or mul.kind is not OpKind.MUL or mul.attrs.get("op") != "mul" or len(mul.inputs) != 2:
            continue
        a, b = mul.inputs
        for x, t in ((a, b), (b, a)):
            if x.shape is None or x.shape != mul.outputs[0].shape:
                continue  # x * f(x) broadcast to another shape is not a unary node
            unary = _match_unary(x, t)
            if unary is not None:
                op, chain, attrs = unary
                removed.update(id(n) for n in _replace(graph, mul, x, op, attrs, chain))
                fused += 1
                break
            gelu = _match_gelu(x, t)
            if gelu is not None and gelu[0].shape == x.shape:
                removed.update(id(n) for n in _replace(graph, mul, gelu[0], "gelu", gelu[2], gelu[1]))
                fused += 1
                break
    return fused
