"""LayerNorm fusion: LayerNorm spelled out of primitives -> one ``norm{type=layer}`` node.

The TorchScript exporter below opset 17 (and other converters) write ``nn.LayerNorm`` as

    mean = ReduceMean(x, axes)            # axes: the last k dims, keepdims
    d    = x - mean                       # [Cast(d, float) for half inputs]
    var  = ReduceMean(d ^ 2, axes)        # Pow(d, 2) or d * d
    y    = d / Sqrt(var + eps)            # or d * Reciprocal(Sqrt(var + eps))
    y    = [Cast(y)] [* weight] [+ bias]  # weight/bias shaped like the normalized dims

Left alone, ``d / sqrt(..)`` is a product of two activations and multiplies path counts
(the gate rule) although the node is a normalisation. Fused, it is exactly the node ONNX's
``LayerNormalization`` (opset 17) lowers to: ``norm{type=layer, axis=-k, epsilon}`` with the
affine constants as its ``scale``/``bias`` Params. Every piece is checked: both reductions
average the same trailing axes with keepdims, the same ``x`` feeds the mean and the
subtraction, the same ``d`` is squared and divided, the exponent is 2, epsilon is a finite
non-negative scalar, casts are float-to-float; weight and bias are absorbed only when they
have exactly the normalized shape and the value they scale has no other use.
"""
from __future__ import annotations

import math

from pai_compiler.ir import Graph, Node, OpKind, Param, Value
from pai_compiler.passes.transform.patterns.match import const_close, const_value, pointwise_of, remove_dead

__all__ = ["fuse_layer_norms"]

_FLOATS = frozenset({"float16", "bfloat16", "float32", "float64"})


def _float_cast(v: Value) -> Node | None:
    """The float-to-float cast producing ``v``, if any."""
    n = pointwise_of(v, "cast")
    if n is not None and n.attrs.get("to") in _FLOATS and n.inputs[0].dtype in _FLOATS:
        return n
    return None


def _mean_axes(v: Value, x: Value | None = None) -> tuple[list[int], Node] | None:
    """The axes of the keepdims ReduceMean producing ``v`` (of ``x`` when given)."""
    n = v.producer
    if n is None or n.kind is not OpKind.POOL or not n.attrs.get("reduce") or n.attrs.get("mode") != "avg":
        return None
    if not n.attrs.get("keepdims", True) or (x is not None and n.inputs[0] is not x):
        return None
    return [int(a) for a in n.attrs["axes"]], n


def _binary(v: Value, kind: OpKind, op: str) -> Node | None:
    n = v.producer
    if n is not None and n.kind is kind and n.attrs.get("op") == op and len(n.inputs) == 2:
        return n
    return None


def _denominator(div: Node) -> tuple[Value, Node, list[Node]] | None:
    """(numerator d, the Sqrt node, extra nodes) for ``d / sqrt(.)`` or ``d * (1 / sqrt(.))``."""
    if div.attrs.get("op") == "div":
        sqrt = pointwise_of(div.inputs[1], "sqrt")
        return (div.inputs[0], sqrt, []) if sqrt is not None else None
    for d, r in (div.inputs, div.inputs[::-1]):
        rec = pointwise_of(r, "reciprocal")
        sqrt = pointwise_of(rec.inputs[0], "sqrt") if rec is not None else None
        if sqrt is not None:
            return d, sqrt, [rec]
    return None


def _is_square(v: Value, d: Value) -> Node | None:
    pw = pointwise_of(v, "pow")
    if pw is not None and pw.inputs[0] is d and not pw.attrs.get("const_first") and const_close(pw, 2.0):
        return pw
    sq = _binary(v, OpKind.MUL, "mul")
    return sq if sq is not None and sq.inputs[0] is d and sq.inputs[1] is d else None


def _affine(y: Value, op: str, normalized: tuple[int, ...]) -> tuple[Node, Param] | None:
    """The pointwise ``op`` with a normalized-shape constant that is ``y``'s only use."""
    if len(y.uses) != 1:
        return None
    n = y.uses[0]
    if n.kind is not OpKind.POINTWISE or n.attrs.get("op") != op or "const" not in n.params:
        return None
    p = n.params["const"]
    shape = list(p.shape)
    while len(shape) > len(normalized) and shape[0] == 1:
        shape.pop(0)
    return (n, p) if tuple(shape) == normalized else None


def _match(div: Node) -> tuple[Value, Node, dict[str, object], dict[str, Param], list[Node]] | None:
    """(x, last node of the pattern, norm attrs, params, pattern nodes) for a LayerNorm at ``div``."""
    den = _denominator(div)
    if den is None:
        return None
    d, sqrt, extra = den
    cast_in = _float_cast(d)
    sub = _binary(cast_in.inputs[0] if cast_in is not None else d, OpKind.ADD, "sub")
    if sub is None:
        return None
    x, mean = sub.inputs
    found = _mean_axes(mean, x)
    if found is None or x.shape is None:
        return None
    axes, mean_node = found
    rank = len(x.shape)
    start = rank - len(axes)
    if not axes or axes != list(range(start, rank)) or not all(isinstance(s, int) for s in x.shape[start:]):
        return None
    eps_add = pointwise_of(sqrt.inputs[0], "add")
    eps = const_value(eps_add) if eps_add is not None else None
    if eps is None or not math.isfinite(eps) or eps < 0:
        return None
    var = _mean_axes(eps_add.inputs[0])
    square = _is_square(var[1].inputs[0], d) if var is not None and var[0] == axes else None
    if square is None:
        return None
    chain = [div, *extra, sqrt, eps_add, var[1], square, *([cast_in] if cast_in else []), sub, mean_node]
    last = div
    user = div.outputs[0].uses[0] if len(div.outputs[0].uses) == 1 else None
    if user is not None and user.outputs and _float_cast(user.outputs[0]) is not None:
        last = user  # the cast back to the input's dtype
        chain.insert(0, last)
    normalized = tuple(int(s) for s in x.shape[start:])
    params: dict[str, Param] = {}
    for op, key in (("mul", "scale"), ("add", "bias")):
        found_affine = _affine(last.outputs[0], op, normalized)
        if found_affine is not None:
            last, params[key] = found_affine
            chain.insert(0, last)
    attrs: dict[str, object] = {"type": "layer", "epsilon": eps, "axis": start - rank}
    return x, last, attrs, params, chain


def fuse_layer_norms(graph: Graph) -> int:
    """Replace every decomposed LayerNorm by one ``norm`` node; return how many."""
    fused = 0
    removed: set[int] = set()
    for div in graph.nodes:
        if id(div) in removed or div.kind is not OpKind.MUL or div.attrs.get("op") not in ("div", "mul") or len(div.inputs) != 2:
            continue
        match = _match(div)
        if match is None:
            continue
        x, last, attrs, params, chain = match
        out = last.outputs[0]
        if out.shape != x.shape:
            continue  # a constant broadcast the result to another shape
        norm = graph.add_node(OpKind.NORM, graph.fresh_name(f"{div.name}_layernorm"), [x],
                              [(graph.fresh_name(out.name + "_layernorm"), out.shape, out.dtype)],
                              params=params, attrs=attrs, origin=last.origin, before=last)
        graph.replace_all_uses(out, norm.outputs[0])
        removed.update(id(n) for n in remove_dead(graph, chain))
        fused += 1
    return fused
