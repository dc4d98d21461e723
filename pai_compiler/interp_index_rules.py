"""The interpreter's shape and index rule bodies: data movement, embedding lookups, run-time gathers, index arithmetic.

``reshape`` (reshape/transpose/slice/gather/pad/expand... on one tensor), ``embedding`` (ONNX
``Gather`` of a table's rows by integer indices, negative ones included), ``where``,
``dynamic_gather``, ``compare``, ``cumsum``, ``gather_along`` / ``gather_nd``, ``scatter_nd`` /
``scatter_along`` (ONNX ScatterND / ScatterElements: ``out = data`` with ``updates`` written at the
indexed positions, ``out[indices[i]] = updates[i]``; ``reduction="add"`` adds them instead) and
``shape_data`` (a ``ShapeProgram`` run at the bound sizes): real semantics, which the ``paths``
mode shares for index data and for data movement (paths move exactly as values do: a scattered
position carries the update's paths, every other position the data's).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pai_compiler.errors import PaicError
from pai_compiler.interp_rules import RuleContext
from pai_compiler.ir import Node
from pai_compiler.ir.shape_program import ShapeProgram, gather_elements

__all__ = [
    "reshape", "pad_all_axes", "lookup_shape", "embedding", "where", "dynamic_gather", "COMPARE_FN", "compare", "cumsum", "arg_reduce",
    "gather_along", "gather_nd", "scatter_nd", "scatter_along", "shape_data",
]


def reshape(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    x = args[0]
    a = node.attrs
    op = a["op"]
    if op == "reshape":
        return [x.reshape(it.dims(node.outputs[0].shape))]
    if op == "transpose":
        return [x.permute(a["perm"])]
    if op == "gather":
        idx = torch.as_tensor(np.asarray(a["indices"], dtype=np.int64).reshape(a["indices_shape"]), device=x.device)
        idx = _wrap(idx, x.shape[a["axis"]])
        flat = torch.index_select(x, a["axis"], idx.reshape(-1))
        return [flat.reshape(*x.shape[: a["axis"]], *idx.shape, *x.shape[a["axis"] + 1 :])]
    if op == "slice":
        index = [slice(None)] * x.dim()
        for st, en, ax, sp in zip(a["starts"], a["ends"], a["axes"], a["steps"]):
            if sp < 0:
                return [_neg_slice(x, a)]
            index[ax] = slice(*slice(st, en, sp).indices(x.shape[ax]))
        return [x[tuple(index)]]
    if op == "expand":
        return [x.expand(*it.dims(node.outputs[0].shape))]
    if op == "pad":
        return [pad_all_axes(x, a["pads"])]
    raise PaicError(f"node {node.name!r}: reshape op {op!r} has no torch rule")


def _neg_slice(x: torch.Tensor, a: dict[str, Any]) -> torch.Tensor:
    arr_idx = []
    for ax in range(x.dim()):
        arr_idx.append(torch.arange(x.shape[ax]))
    for st, en, ax, sp in zip(a["starts"], a["ends"], a["axes"], a["steps"]):
        arr_idx[ax] = torch.arange(x.shape[ax])[slice(*slice(st, en, sp).indices(x.shape[ax]))] if sp > 0 else torch.tensor(list(range(*slice(st, en, sp).indices(x.shape[ax]))), dtype=torch.long)
    for ax, idx in enumerate(arr_idx):
        x = torch.index_select(x, ax, idx.to(x.device))
    return x


def pad_all_axes(x: torch.Tensor, pads: list[int]) -> torch.Tensor:
    n = x.dim()
    flat: list[int] = []
    for i in reversed(range(n)):
        flat += [pads[i], pads[i + n]]
    return F.pad(x, flat)


# ---- opaque operators with a known meaning (attrs["op"]) -----------------------------------
def lookup_shape(node: Node, table: tuple[int, ...], indices: torch.Tensor) -> list[int]:
    axis = node.attrs.get("axis", 0) % len(table)
    return [*table[:axis], *indices.shape, *table[axis + 1 :]]


def embedding(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """``table`` gathered along ``axis`` by the integer indices ``args[0]`` (ONNX Gather: an
    index ``i < 0`` reads ``i + table.shape[axis]``; for axis 0 this is ``F.embedding``)."""
    p = node.params["table"]
    idx = args[0]
    if it.lookup == "ones" and not node.attrs.get("positional"):
        return [torch.ones(lookup_shape(node, p.shape, idx), dtype=it.dtype, device=it.device)]
    table = it.weight(p)
    axis = node.attrs.get("axis", 0) % table.dim()
    n = table.shape[axis]
    idx = idx.to(device=table.device, dtype=torch.int64)
    if idx.numel() and (bool((idx < -n).any()) or bool((idx >= n).any())):
        raise PaicError(f"node {node.name!r} (embedding): indices run {int(idx.min())}..{int(idx.max())}, the table has {n} entries on axis {axis}")
    idx = _wrap(idx, n)
    flat = torch.index_select(table, axis, idx.reshape(-1))
    return [flat.reshape(lookup_shape(node, tuple(table.shape), idx))]


def where(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """ONNX Where: ``args[1]`` where the condition ``args[0]`` holds, else ``args[2]`` (broadcast)."""
    cond, a, b = args
    return [torch.where(cond.to(torch.bool), a, b.to(a.dtype) if a.is_floating_point() else b)]


def dynamic_gather(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """ONNX Gather of an activation by run-time integer indices (negative ones count from the end);
    paths move exactly as values do."""
    data, idx = args
    axis = node.attrs.get("axis", 0) % data.dim()
    idx = idx.to(device=data.device, dtype=torch.int64)
    idx = _wrap(idx, data.shape[axis])
    flat = torch.index_select(data, axis, idx.reshape(-1))
    return [flat.reshape(*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :])]


#: ``op="compare"`` functions: a bool of one operand (``not``), of two (broadcast), or of one and ``attrs["scalar"]``
COMPARE_FN: dict[str, Callable[[torch.Tensor, Any], torch.Tensor]] = {
    "eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge,
    "and": lambda a, b: torch.logical_and(a, b), "or": lambda a, b: torch.logical_or(a, b),
    "xor": lambda a, b: torch.logical_xor(a, b), "not": lambda a, b: torch.logical_not(a),
}


def compare(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """Index data: ``fn(args[0], args[1] or attrs["scalar"])`` as a bool tensor (``ne(input_ids, pad)``, mask ``and``)."""
    fn = node.attrs["fn"]
    if fn not in COMPARE_FN:
        raise PaicError(f"node {node.name!r}: comparison {fn!r} has no torch rule (known: {', '.join(COMPARE_FN)})")
    other = args[1] if len(args) > 1 else node.attrs.get("scalar")
    return [COMPARE_FN[fn](args[0], other)]


def cumsum(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """Index data: the running sum along ``axis`` (``exclusive``/``reverse`` as ONNX CumSum); a bool
    input counts as int64, as torch's does."""
    x = args[0].long() if args[0].dtype == torch.bool else args[0]
    axis = int(node.attrs.get("axis", 0)) % max(x.dim(), 1)
    if node.attrs.get("reverse"):
        x = x.flip(axis)
    out = torch.cumsum(x, axis)
    if node.attrs.get("exclusive"):
        out = out - x
    target = getattr(torch, node.outputs[0].dtype, None) if node.outputs else None
    out = out.to(target) if isinstance(target, torch.dtype) and not target.is_floating_point else out  # torch widens, ONNX keeps
    return [out.flip(axis) if node.attrs.get("reverse") else out]


def arg_reduce(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """Index data: the position of the first max (``fn="max"``) or min along ``axis`` (ONNX ArgMax/ArgMin,
    ``torch.argmax``: the first of equal values; ``select_last_index`` takes the last), int64."""
    x = args[0].long() if args[0].dtype == torch.bool else args[0]
    axis, keep = int(node.attrs.get("axis", 0)) % max(x.dim(), 1), bool(node.attrs.get("keepdims", True))
    if node.attrs.get("select_last_index"):
        size = x.shape[axis]
        x = x.flip(axis)
    out = (torch.argmax if node.attrs.get("fn", "max") == "max" else torch.argmin)(x, dim=axis, keepdim=keep)
    return [size - 1 - out if node.attrs.get("select_last_index") else out]


def gather_along(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """``torch.gather(data, axis, indices)`` (ONNX GatherElements): ``out[i][j] = data[i][indices[i][j]]`` on axis 1."""
    data, idx = args
    axis = int(node.attrs.get("axis", 0)) % data.dim()
    idx = idx.to(device=data.device, dtype=torch.int64)
    return [torch.gather(data, axis, _wrap(idx, data.shape[axis]))]


def gather_nd(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """ONNX GatherND on index data (see :func:`pai_compiler.ir.shape_program.gather_nd`)."""
    data, idx = args
    batch_dims, depth = int(node.attrs.get("batch_dims", 0)), idx.shape[-1]
    batch = math.prod(data.shape[:batch_dims])
    rows = idx.to(device=data.device, dtype=torch.int64).reshape(batch, -1, depth)
    rows = _wrap(rows, torch.tensor(data.shape[batch_dims:batch_dims + depth], device=data.device))
    flat = data.reshape(batch, *data.shape[batch_dims:])
    picked = flat[(torch.arange(batch, device=data.device)[:, None], *rows.unbind(-1))]
    return [picked.reshape(*idx.shape[:-1], *data.shape[batch_dims + depth:])]


def _wrap(idx: torch.Tensor, sizes: torch.Tensor | int) -> torch.Tensor:
    """Integer indices as int64, negative ones counted from the end (``i + size``)."""
    idx = idx.to(torch.int64)
    return torch.where(idx < 0, idx + sizes, idx)


def _adds(node: Node) -> bool:
    """True for ``reduction="add"``, False for ``"none"``; any other reduction is an error naming the node."""
    reduction = node.attrs.get("reduction", "none")
    if reduction not in ("none", "add"):
        raise PaicError(f"node {node.name!r}: scatter reduction {reduction!r} has no rule (paic evaluates 'none' and 'add')")
    return reduction == "add"


def scatter_nd(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """ONNX ScatterND: a copy of ``data`` with ``out[indices[j]] = updates[j]`` for every index tuple
    ``indices[j]`` (the last axis of ``indices``, of length ``k``, addresses the first ``k`` axes of
    ``data``; ``updates`` has shape ``indices.shape[:-1] + data.shape[k:]``); ``reduction="add"`` adds."""
    data, idx, updates = args
    depth = idx.shape[-1]
    rest = data.shape[depth:]
    sizes = torch.tensor(data.shape[:depth], dtype=torch.int64, device=data.device)
    rows = _wrap(idx.to(data.device).reshape(-1, depth), sizes)
    strides = torch.tensor([math.prod(data.shape[i + 1:depth]) for i in range(depth)], dtype=torch.int64, device=data.device)
    flat_index = (rows * strides).sum(dim=1)
    flat = data.reshape(-1, *rest).clone()
    values = updates.to(device=data.device, dtype=data.dtype).reshape(-1, *rest)
    out = flat.index_add(0, flat_index, values) if _adds(node) else flat.index_copy(0, flat_index, values)
    return [out.reshape(data.shape)]


def scatter_along(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """ONNX ScatterElements (``torch.scatter``): ``out[i][indices[i][j]] = updates[i][j]`` on axis 1;
    ``reduction="add"`` adds (``scatter_add``)."""
    data, idx, updates = args
    axis = int(node.attrs.get("axis", 0)) % data.dim()
    idx = _wrap(idx.to(data.device), data.shape[axis])
    values = updates.to(device=data.device, dtype=data.dtype)
    if _adds(node):
        return [torch.scatter_add(data, axis, idx, values)]
    return [torch.scatter(data, axis, idx, values)]


def shape_data(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run the node's :class:`ShapeProgram` at the bound sizes (positions, masks, buckets)."""
    program: ShapeProgram = node.attrs["program"]
    feeds = tuple((name, tuple(int(v) for v in it.dims(entries))) for name, _, entries in program.feeds)
    shapes = tuple(shape for _, shape, _ in program.feeds)
    value = _run_program(program.model, feeds, shapes)
    t = torch.as_tensor(value.copy(), device=it.device)
    return [t.to(it.dtype) if t.is_floating_point() else t]


@lru_cache(maxsize=256)
def _run_program(model: bytes, feeds: tuple[tuple[str, tuple[int, ...]], ...], shapes: tuple[tuple[int, ...], ...]) -> np.ndarray:
    import onnx  # heavy: only models with shape-dependent data get here
    from onnx.reference import ReferenceEvaluator

    inputs = {name: np.array(values, dtype=np.int64).reshape(shape) for (name, values), shape in zip(feeds, shapes)}
    evaluator = ReferenceEvaluator(onnx.load_from_string(model), new_ops=[_gather_elements_op()])
    with np.errstate(all="ignore"):  # log(0) = -inf in T5's relative buckets is the intended value, as in onnxruntime
        return np.asarray(evaluator.run(None, inputs)[0])


@lru_cache(maxsize=1)
def _gather_elements_op() -> type:
    from onnx.reference.op_run import OpRun  # heavy: see _run_program

    class GatherElements(OpRun):  # onnx's reference rejects indices smaller than the data on other axes
        op_domain = ""

        def _run(self, data: np.ndarray, indices: np.ndarray, axis: int = 0) -> tuple[np.ndarray]:  # type: ignore[override]
            return (gather_elements(data, indices, axis),)

    return GatherElements
