"""Tensors computed from shape symbols: ``Range(0, seq)``, a position table sliced to ``seq``,
a mask expanded to ``(batch, 1, seq, seq)``, T5's relative-position buckets.

Their values are not known at compile time (their *size* depends on a symbol), yet they carry
no model data: they are functions of the bound symbols only. The frontend keeps each as a
``ShapeData``: the ONNX nodes that compute it, their constant leaves, the symbolic shape
vectors they read, and the output's symbolic shape (per-op rules below: broadcasting for
elementwise ops, ``ceil((limit - start) / delta)`` for Range, ``end - start`` for a slice by a
symbolic end, the index shape for GatherElements ...). Where an activation reads it, it becomes
an ``opaque`` IR node with ``op="shape_data"`` and a :class:`~pai_compiler.ir.shape_program.ShapeProgram`
that the interpreter runs at the bound sizes (real mode) or reads as zeros (paths mode: data
constants carry no paths).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pai_compiler.errors import ModelError
from pai_compiler.frontends.onnx.movement import DynamicArgument, Movement, movement_shape
from pai_compiler.frontends.onnx.static import Const, broadcast_shapes, simplify_dim
from pai_compiler.ir import Dim
from pai_compiler.ir.dims import ceil_div, dim_sum, is_symbolic, plain, sym
from pai_compiler.frontends.onnx.proto_view import NodeView
from pai_compiler.ir.shape_program import ShapeProgram
from pai_compiler.onnx_wire import tensor_dtype

__all__ = ["ShapeData", "SHAPE_DATA_RULES", "make_shape_data", "shape_program"]

Operand = Any  # Const | ShapeData | None


@dataclass(frozen=True)
class ShapeData:
    """A tensor that ONNX ``nodes`` compute from constant ``leaves`` and symbolic shape vectors."""

    output: str
    shape: tuple[Dim, ...]
    dtype: np.dtype
    nodes: tuple[Any, ...] = ()  # NodeProtos in topological order
    leaves: dict[str, np.ndarray] = field(default_factory=dict)
    symbolic: dict[str, np.ndarray] = field(default_factory=dict)  # object arrays of sympy sizes


def _shape_of(x: Operand) -> tuple[Dim, ...]:
    if isinstance(x, ShapeData):
        return x.shape
    return x.broadcast_to or tuple(int(d) for d in x.array.shape)


def _values(x: Operand, what: str) -> list[Dim]:
    if not isinstance(x, Const):
        raise DynamicArgument(f"{what} is computed from run-time sizes")
    return [simplify_dim(v) if isinstance(v, (int, np.integer)) or is_symbolic(v) else v for v in x.array.reshape(-1)]


def _broadcast(ins: list[Operand], attrs: dict[str, Any]) -> tuple[Dim, ...]:
    return broadcast_shapes(*[_shape_of(x) for x in ins if x is not None])


def _range(ins: list[Operand], attrs: dict[str, Any]) -> tuple[Dim, ...]:
    start, limit, delta = (plain(_values(x, "a Range bound")[0]) for x in ins)
    count = ceil_div(limit - start, delta)
    return (simplify_dim(max(0, count) if isinstance(count, int) else sym().Max(0, count)),)


def _slice(ins: list[Operand], attrs: dict[str, Any]) -> tuple[Dim, ...]:
    shape = list(_shape_of(ins[0]))
    starts, ends = _values(ins[1], "a Slice start"), _values(ins[2], "a Slice end")
    axes = _values(ins[3], "Slice axes") if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = _values(ins[4], "Slice steps") if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = int(axis) % len(shape)
        size = shape[axis]
        if all(isinstance(v, int) for v in (start, end, step, size)):
            shape[axis] = len(range(*slice(start, end, step).indices(size)))
            continue
        if step != 1 or (isinstance(start, int) and start < 0) or (isinstance(end, int) and end < 0):
            raise DynamicArgument("a slice with a negative or stepped run-time bound")
        end = size if isinstance(end, int) and end >= 2**31 else end  # x[a:] up to a symbolic size
        shape[axis] = simplify_dim(plain(end) - plain(start))  # an end within the axis (a table cut to the sequence)
    return tuple(shape)


def _gather(ins: list[Operand], attrs: dict[str, Any]) -> tuple[Dim, ...]:
    data, idx = _shape_of(ins[0]), _shape_of(ins[1])
    axis = int(attrs.get("axis", 0)) % len(data)
    return (*data[:axis], *idx, *data[axis + 1 :])


def _concat(ins: list[Operand], attrs: dict[str, Any]) -> tuple[Dim, ...]:
    shapes = [_shape_of(x) for x in ins if x is not None]
    axis = int(attrs["axis"]) % len(shapes[0])
    out = list(shapes[0])
    out[axis] = simplify_dim(dim_sum(s[axis] for s in shapes))
    return tuple(out)


def _movement(op: str) -> Callable[[list[Operand], dict[str, Any]], tuple[Dim, ...]]:
    def rule(ins: list[Operand], attrs: dict[str, Any]) -> tuple[Dim, ...]:
        shape, _ = movement_shape(op, Movement(_shape_of(ins[0]), ins, attrs))
        if shape is None:
            raise DynamicArgument(f"{op} of unknown rank")
        return shape
    return rule


_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Mod", "Pow", "Max", "Min", "Equal", "Less", "Greater", "LessOrEqual",
                "GreaterOrEqual", "And", "Or", "Xor", "Not", "Neg", "Abs", "Sign", "Floor", "Ceil", "Round", "Log", "Exp",
                "Sqrt", "Reciprocal", "Cast", "IsNaN", "IsInf", "Identity", "Where", "Clip", "Relu", "Trilu", "CumSum")
_BOOL_OPS = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not", "IsNaN", "IsInf"}

#: ONNX op_type -> symbolic output shape of a ShapeData node, from its operands and attrs
SHAPE_DATA_RULES: dict[str, Callable[[list[Operand], dict[str, Any]], tuple[Dim, ...]]] = {
    **{op: _broadcast for op in _ELEMENTWISE},
    "CastLike": lambda ins, a: _shape_of(ins[0]),
    "Range": _range,
    "ConstantOfShape": lambda ins, a: tuple(_values(ins[0], "the shape of ConstantOfShape")),
    "Expand": lambda ins, a: broadcast_shapes(_shape_of(ins[0]), tuple(_values(ins[1], "the shape of Expand"))),
    "Slice": _slice,
    "Gather": _gather,
    "GatherElements": lambda ins, a: _shape_of(ins[1]),
    "Concat": _concat,
    **{op: _movement(op) for op in ("Reshape", "Unsqueeze", "Squeeze", "Transpose", "Flatten")},
}


def _dtype(node: Any, ins: list[Operand], attrs: dict[str, Any]) -> np.dtype:
    op = node.op_type
    if op in _BOOL_OPS:
        return np.dtype(bool)
    if op == "Cast":
        return tensor_dtype(attrs["to"])
    if op == "ConstantOfShape":
        value = attrs.get("value")
        return np.dtype(np.float32) if value is None else np.asarray(value).dtype
    first = ins[2] if op == "Where" else (ins[1] if op == "CastLike" else ins[0])
    return first.dtype if isinstance(first, ShapeData) else np.asarray(first.array).dtype


def make_shape_data(node: Any, ins: list[Operand], attrs: dict[str, Any]) -> ShapeData:
    """``node`` on operands of which some are ShapeData or sized by symbols; DynamicArgument if
    paic has no shape rule for it (the caller keeps the node opaque and names it)."""
    rule = SHAPE_DATA_RULES.get(node.op_type)
    if rule is None or node.domain not in ("", "ai.onnx"):
        raise DynamicArgument(f"no shape rule for {node.op_type}")
    shape = rule(ins, attrs)
    nodes: dict[str, Any] = {}
    leaves: dict[str, np.ndarray] = {}
    symbolic: dict[str, np.ndarray] = {}
    extra: list[Any] = []
    for name, x in zip(node.input, ins):
        if x is None:
            continue
        if isinstance(x, ShapeData):
            nodes.update((n.output[0], n) for n in x.nodes)
            leaves.update(x.leaves)
            symbolic.update(x.symbolic)
        elif x.broadcast_to is not None:  # Expand(constant, symbolic shape): leaf, its size and the Expand
            from onnx import helper

            leaves[name + "__data"] = np.asarray(x.array)
            symbolic[name + "__shape"] = np.array(list(x.broadcast_to), dtype=object)
            extra.append(helper.make_node("Expand", [name + "__data", name + "__shape"], [name]))
        elif x.symbolic:
            symbolic[name] = x.array
        else:
            leaves[name] = np.asarray(x.array)
    for n in extra:
        nodes[n.output[0]] = n
    nodes[node.output[0]] = node
    return ShapeData(node.output[0], tuple(simplify_dim(d) for d in shape), _dtype(node, ins, attrs), tuple(nodes.values()), leaves, symbolic)


def shape_program(data: ShapeData, opset: int) -> ShapeProgram:
    """The ONNX model that computes ``data``: constant leaves as initializers, every symbolic
    shape vector a graph input (int64) that the interpreter feeds at the bound sizes."""
    from onnx import helper, numpy_helper

    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(np.int64)), list(arr.shape)) for name, arr in data.symbolic.items()]
    inits = [numpy_helper.from_array(np.asarray(arr), name) for name, arr in data.leaves.items()]
    out = helper.make_tensor_value_info(data.output, helper.np_dtype_to_tensor_dtype(data.dtype), None)
    nodes = [n.to_proto() if isinstance(n, NodeView) else n for n in data.nodes]  # the model's nodes are views
    graph = helper.make_graph(nodes, "shape_data", inputs, [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        feeds = tuple((name, tuple(arr.shape), tuple(arr.reshape(-1))) for name, arr in data.symbolic.items())
    except Exception as exc:  # pragma: no cover - defensive: names the value
        raise ModelError(f"value {data.output!r}: cannot record its shape program: {exc}") from exc
    return ShapeProgram(model.SerializeToString(), feeds, len(data.nodes))
