"""ONNX index-data ops on run-time tensors: comparisons and logic (bool), CumSum, ArgMax/ArgMin, GatherElements, GatherND, ScatterND, ScatterElements.

What an exporter leaves of position ids computed from the inputs (``cumsum(ids != pad)``) or of
a padding mask combined with a causal one (``And``) once the sizes are dynamic, or of a padding
mask indexed per (batch, key) position (the dynamo exporter's ``mask[b_idx, kv_idx]``: GatherND).
Each becomes an opaque node the interpreter runs (``op="compare"`` with ``fn``, ``op="cumsum"``,
``op="gather_elements"``, ``op="gather_nd"``); such values are integer or bool, so they carry no paths.
ScatterND / ScatterElements (``op="scatter_nd"`` / ``op="scatter_elements"``: ``data`` with ``updates``
written at the indexed positions) are what exporters make of a slice assignment
(``shifted[:, 1:] = ids[:, :-1]`` in BART's ``shift_tokens_right``, a key/value cache update): data
movement of any dtype, its output the data's shape and dtype.
"""
from __future__ import annotations

from typing import Any

from pai_compiler.frontends.onnx.static import broadcast_shapes
from pai_compiler.ir import OpKind

__all__ = ["INDEX_HANDLERS", "COMPARE_OPS", "SCATTER_REDUCTIONS"]

#: the scatter reductions the interpreter evaluates (ONNX's ``mul``/``max``/``min`` stay opaque)
SCATTER_REDUCTIONS = ("none", "add")
#: ONNX op_type -> the interpreter's ``compare`` function
COMPARE_OPS = {"Equal": "eq", "Less": "lt", "LessOrEqual": "le", "Greater": "gt", "GreaterOrEqual": "ge",
               "And": "and", "Or": "or", "Xor": "xor", "Not": "not"}


def _add(imp: Any, node: Any, label: str, values: list[Any], shape: Any, dtype: str, attrs: dict[str, Any]) -> None:
    ir = imp.graph.add_node(OpKind.OPAQUE, imp.graph.fresh_name(label), values, [(node.output[0], shape, dtype)],
                            attrs={**attrs, "op_type": node.op_type, "domain": node.domain}, origin=node.name)
    imp.env[node.output[0]] = ir.outputs[0]


def _compare(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    values = [imp.operand_value(x, f"{label}_{i}") for i, x in enumerate(ins)]
    shapes = [v.shape for v in values]
    shape = None if any(s is None for s in shapes) else broadcast_shapes(*shapes)
    _add(imp, node, label, values, shape, "bool", {"op": "compare", "fn": COMPARE_OPS[node.op_type]})


def _cumsum(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    x, axis = ins[0], ins[1]
    axis_array = getattr(axis, "array", None)
    value = imp.operand_value(x, f"{label}_0")
    if axis_array is None or axis_array.size != 1:
        why = "CumSum with a run-time axis"
        imp.warnings.append(f"node {label!r} (CumSum) is opaque: {why}")
        _add(imp, node, label, [value], value.shape, value.dtype, {"reason": why})
        return
    _add(imp, node, label, [value], value.shape, value.dtype,
         {"op": "cumsum", "axis": int(axis_array.reshape(-1)[0]), "exclusive": bool(attrs.get("exclusive", 0)), "reverse": bool(attrs.get("reverse", 0))})


def _arg_reduce(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    x = imp.operand_value(ins[0], f"{label}_0")
    axis, keep = int(attrs.get("axis", 0)), bool(attrs.get("keepdims", 1))
    if x.dtype.startswith(("float", "bfloat")):  # the argmax of activations (logits) is no path carrier: no rule, as the torch route
        why = f"{node.op_type} of floats (only integer/bool index data has a rule)"
        imp.warnings.append(f"node {label!r} ({node.op_type}) is opaque: {why}")
        _add(imp, node, label, [x], None, "int64", {"reason": why})
        return
    shape = None
    if x.shape is not None:
        axis %= len(x.shape)
        shape = tuple(1 if i == axis else d for i, d in enumerate(x.shape)) if keep else tuple(d for i, d in enumerate(x.shape) if i != axis)
    _add(imp, node, label, [x], shape, "int64", {"op": "arg_reduce", "fn": node.op_type[3:].lower(), "axis": axis, "keepdims": keep,
                                               "select_last_index": bool(attrs.get("select_last_index", 0))})


def _gather_elements(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    data, idx = (imp.operand_value(x, f"{label}_{i}") for i, x in enumerate(ins))
    _add(imp, node, label, [data, idx], idx.shape, data.dtype, {"op": "gather_elements", "axis": int(attrs.get("axis", 0))})


def _gather_nd(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    data, idx = (imp.operand_value(x, f"{label}_{i}") for i, x in enumerate(ins))
    batch_dims = int(attrs.get("batch_dims", 0))
    depth = idx.shape[-1] if idx.shape else None
    shape = None if data.shape is None or idx.shape is None or not isinstance(depth, int) else \
        (*idx.shape[:-1], *data.shape[batch_dims + depth:])
    _add(imp, node, label, [data, idx], shape, data.dtype, {"op": "gather_nd", "batch_dims": batch_dims})


def _scatter(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    data, idx, updates = (imp.operand_value(x, f"{label}_{i}") for i, x in enumerate(ins))
    reduction = attrs.get("reduction", "none")
    reduction = reduction.decode() if isinstance(reduction, bytes) else str(reduction)
    if reduction not in SCATTER_REDUCTIONS:
        why = f"{node.op_type} with reduction {reduction!r} (paic evaluates {' and '.join(map(repr, SCATTER_REDUCTIONS))})"
        imp.warnings.append(f"node {label!r} ({node.op_type}) is opaque: {why}")
        _add(imp, node, label, [data, idx, updates], data.shape, data.dtype, {"reason": why})
        return
    extra = {"axis": int(attrs.get("axis", 0))} if node.op_type != "ScatterND" else {}  # Scatter (opset 9/10) = ScatterElements
    op = "scatter_nd" if node.op_type == "ScatterND" else "scatter_elements"
    _add(imp, node, label, [data, idx, updates], data.shape, data.dtype, {"op": op, "reduction": reduction, **extra})


INDEX_HANDLERS = {**{op: _compare for op in COMPARE_OPS}, "CumSum": _cumsum, "ArgMax": _arg_reduce, "ArgMin": _arg_reduce, "GatherElements": _gather_elements,
                  "GatherND": _gather_nd, "ScatterND": _scatter, "ScatterElements": _scatter, "Scatter": _scatter}
