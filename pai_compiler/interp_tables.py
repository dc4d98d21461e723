"""The interpreter's rule tables: which rule evaluates a node, per ``OpKind`` and mode, and the conv/linear rules.

``RULES`` holds the real semantics, ``PATH_RULES`` the ``paths`` semantics where it differs
(conv/transposed conv/linear with the mask as weight and no bias, norms/activations/softmax as identity, data
constants as zero, pooling as a sum or the model's own, products by the gate rule); bodies in
:mod:`pai_compiler.interp_rules` (pointwise, norms, pooling, adds), :mod:`pai_compiler.interp_index_rules`
(reshapes, lookups, gathers, index arithmetic) and :mod:`pai_compiler.interp_path_rules` (path
overrides, attention). Integer/bool values (index data) keep their real semantics in both modes.

Opaque nodes are evaluated only when ``attrs["op"]`` names a
rule in ``OPAQUE_RULES`` (see :func:`rule_for`); every other opaque node stops the interpreter
with a ``PaicError``. Such ops: ``op="shape_data"`` (a tensor computed from the bound sizes
only, e.g. positions or masks: its ``ShapeProgram``; in paths mode a float one is zeros),
``op="gather"`` (an activation gathered by run-time indices: values and counts alike),
``op="where"`` (ONNX Where; paths: either branch's counts, summed), ``op="scatter_nd"`` /
``op="scatter_elements"`` (ONNX ScatterND / ScatterElements: data movement, paths as values), ``op="resize"`` (nearest/linear
resizing, :mod:`pai_compiler.interp_resize`) and the **embedding lookup** (``op="embedding"``: the rows
of a constant, non-prunable ``table`` Param picked along ``axis`` by a dynamic integer input,
ONNX ``Gather`` semantics, negative indices included). In ``real`` mode it is the lookup
(``lookup="ones"`` makes it output ones instead: SynFlow's all-ones input); in ``paths`` mode
its output is a *path source*, exactly like a float graph input of the output's shape: all
ones whatever the indices, and nothing flows back into the indices or the table.

``distinct_rows=True`` computes a linear layer once per run of equal consecutive input rows (an
all-ones forward gives a transformer's patch tokens equal rows): with ``d`` the distinct rows and
``inverse`` each row's run, ``y = (d · Wᵀ)[inverse]``; backward keeps each row's own input gradient
``dy · W`` and sums equal rows' output gradients for the weight, ``dW = (Σ_{i: inverse_i = r} dy_i)ᵀ · d_r``.
The same function and gradients as ``F.linear``, on GEMMs ~100× smaller for ViT-B/16.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F

from pai_compiler.errors import PaicError
from pai_compiler.interp_index_rules import (arg_reduce, compare, cumsum, dynamic_gather, embedding, gather_along, gather_nd, reshape, scatter_along, scatter_nd,
                                             shape_data, where)
from pai_compiler.interp_resize import path_resize, resize
from pai_compiler.interp_path_rules import attention, path_add, path_embedding, path_identity, path_mul, path_shape_data, path_where
from pai_compiler.interp_rules import RuleContext, add, broadcast_operands, constant, pad_spatial, pool, real_mul, real_norm, real_pointwise, split
from pai_compiler.ir import Node, OpKind, Value

__all__ = [
    "Mode", "Rule", "RULES", "PATH_RULES", "OPAQUE_RULES", "rule_for", "no_rule_message", "conv_forward", "conv_transpose_forward", "is_index_data",
    "indexes_lookups_only", "index_lookups",
]

Mode = Literal["real", "paths"]
Rule = Callable[[RuleContext, Node, list[torch.Tensor]], list[torch.Tensor]]


def conv_forward(it: RuleContext, node: Node, args: list[torch.Tensor], *, bias: bool = True) -> list[torch.Tensor]:
    """A conv node's real output on ``args[0]`` (masked weights; ``bias=False`` leaves the bias out)."""
    x = pad_spatial(args[0], node.attrs["pads"])
    w = it.oi_weight(node.params["weight"])
    b = it.weight(node.params["bias"]) if bias and "bias" in node.params else None
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(w.dim() - 2)
    if conv is None:
        raise PaicError(f"conv {node.name!r}: {w.dim() - 2}-d convolution is not supported")
    return [conv(x, w, b, stride=node.attrs["strides"], dilation=node.attrs["dilations"], groups=node.attrs["groups"])]


def conv_transpose_forward(it: RuleContext, node: Node, args: list[torch.Tensor], *, bias: bool = True) -> list[torch.Tensor]:
    """A transposed conv's output: the full transposed conv (no pads), then ``pads`` cropped from
    each end and ``output_padding`` zeros appended at the end (one ``F.pad``, negative = crop),
    then the bias. Stored weight (in, out/groups, k...), as torch and ONNX keep it."""
    w = it.weight(node.params["weight"])
    spatial = w.dim() - 2
    deconv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}.get(spatial)
    if deconv is None:
        raise PaicError(f"conv_transpose {node.name!r}: {spatial}-d transposed convolution is not supported")
    y = deconv(args[0], w, None, stride=node.attrs["strides"], dilation=node.attrs["dilations"], groups=node.attrs["groups"])
    pads, extra = node.attrs["pads"], node.attrs["output_padding"]
    flat: list[int] = []
    for i in reversed(range(spatial)):
        flat += [-pads[i], extra[i] - pads[i + spatial]]
    y = F.pad(y, flat) if any(flat) else y
    if bias and "bias" in node.params:
        y = y + it.weight(node.params["bias"]).reshape(-1, *[1] * spatial)
    return [y]


def _linear(it: RuleContext, node: Node, args: list[torch.Tensor], *, bias: bool = True) -> list[torch.Tensor]:
    w = it.oi_weight(node.params["weight"])
    y = _linear_by_distinct_rows(args[0], w) if it.distinct_rows else F.linear(args[0], w)
    if node.attrs.get("alpha", 1.0) != 1.0 and bias:
        y = y * node.attrs["alpha"]
    if bias and "bias" in node.params:
        y = y + node.attrs.get("beta", 1.0) * it.weight(node.params["bias"])
    return [y]


def _linear_by_distinct_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` computed once per run of equal consecutive rows of ``x``: the same
    function, smaller GEMMs when rows repeat. Plain ``F.linear`` when fewer than half the rows repeat."""
    rows = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else None
    runs = None if rows is None else _equal_row_runs(rows.detach())
    if runs is None:
        return F.linear(x, w)
    return _DistinctRowsLinear.apply(rows, w, *runs).reshape(*x.shape[:-1], w.shape[0])


def _equal_row_runs(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(first row of each run of equal consecutive rows, each row's run index); None unless the
    runs are at most half the rows (one pass, no sort: a class token then equal patches is 2 runs)."""
    if rows.shape[0] < 4:
        return None
    starts = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    starts[1:] = (rows[1:] != rows[:-1]).any(dim=1)
    if 2 * int(starts.sum()) > rows.shape[0]:
        return None
    return rows[starts], torch.cumsum(starts, 0) - 1


class _DistinctRowsLinear(torch.autograd.Function):
    """``y = rows · wᵀ`` from the distinct rows: ``y = (distinct · wᵀ)[inverse]``. Backward, each
    row keeps its own input gradient ``dy · w``; the weight gradient sums the output gradients of
    equal rows first, ``dw = (Σ_{i: rows_i = d} dy_i)ᵀ · d`` over the distinct rows ``d``."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, w: torch.Tensor, distinct: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w, distinct, inverse)
        return F.linear(distinct, w).index_select(0, inverse)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w, distinct, inverse = ctx.saved_tensors
        grad_rows = None
        if ctx.needs_input_grad[0]:
            runs = _equal_row_runs(grad)
            grad_rows = grad @ w if runs is None else (runs[0] @ w).index_select(0, runs[1])
        grad_w = None
        if ctx.needs_input_grad[1]:
            summed = torch.zeros((distinct.shape[0], grad.shape[1]), dtype=grad.dtype, device=grad.device).index_add_(0, inverse, grad)
            grad_w = summed.t() @ distinct
        return grad_rows, grad_w, None, None


RULES: dict[OpKind, Rule] = {
    OpKind.CONSTANT: constant,
    OpKind.CONV: conv_forward,
    OpKind.CONV_TRANSPOSE: conv_transpose_forward,
    OpKind.LINEAR: _linear,
    OpKind.MATMUL: lambda it, n, a: [torch.matmul(a[0], a[1])],
    OpKind.ADD: add,
    OpKind.MUL: real_mul,
    OpKind.CONCAT: lambda it, n, a: [torch.cat(broadcast_operands(it, n, a), dim=n.attrs["axis"])],
    OpKind.SPLIT: split,
    OpKind.NORM: real_norm,
    OpKind.POINTWISE: real_pointwise,
    OpKind.POOL: pool,
    OpKind.SOFTMAX: lambda it, n, a: [(F.log_softmax if n.attrs.get("log") else F.softmax)(a[0], dim=n.attrs["axis"])],
    OpKind.RESHAPE: reshape,
    OpKind.ATTENTION: lambda it, n, a: [attention(it, n, a).output],
}


#: the ``paths`` semantics where it differs from the real one
PATH_RULES: dict[OpKind, Rule] = {
    OpKind.CONSTANT: lambda it, n, a: [torch.zeros(it.dims(n.outputs[0].shape), dtype=it.dtype, device=it.device)],
    OpKind.CONV: lambda it, n, a: conv_forward(it, n, a, bias=False),
    OpKind.CONV_TRANSPOSE: lambda it, n, a: conv_transpose_forward(it, n, a, bias=False),
    OpKind.LINEAR: lambda it, n, a: _linear(it, n, a, bias=False),
    OpKind.ADD: path_add,
    OpKind.MUL: path_mul,
    OpKind.MATMUL: path_mul,
    OpKind.NORM: path_identity,
    OpKind.POINTWISE: path_identity,
    OpKind.SOFTMAX: path_identity,
    OpKind.POOL: lambda it, n, a: pool(it, n, a, as_sum=it.pool == "sum"),
    OpKind.ATTENTION: lambda it, n, a: [attention(it, n, a, paths=True).output],
}


#: ``attrs["op"]`` of an opaque node -> (real rule, paths rule)
OPAQUE_RULES: dict[str, tuple[Rule, Rule]] = {
    "embedding": (embedding, path_embedding),
    "shape_data": (shape_data, path_shape_data),
    "gather": (dynamic_gather, dynamic_gather),
    "where": (where, path_where),
    "compare": (compare, compare),
    "cumsum": (cumsum, cumsum),
    "arg_reduce": (arg_reduce, arg_reduce),
    "gather_elements": (gather_along, gather_along),
    "gather_nd": (gather_nd, gather_nd),
    "scatter_nd": (scatter_nd, scatter_nd),
    "scatter_elements": (scatter_along, scatter_along),
    "resize": (resize, path_resize),
}


def rule_for(node: Node, mode: Mode) -> Rule | None:
    """The interpreter's rule for ``node`` in ``mode`` (None: the node cannot be evaluated).

    ``paths`` mode takes the path rule where one exists and the real rule otherwise; an opaque
    node has a rule only when ``attrs["op"]`` is a key of ``OPAQUE_RULES``. A node whose outputs
    are all integer or bool is index data (positions computed from the ids, masks): it carries
    no paths, so it keeps its real semantics in both modes. A float value computed from index
    data alone with a bool among it (an attention mask turned into an additive bias,
    ``bool(mask) * 1e4 - 1e4``) is a data constant: its real value, but zero paths, as a
    ``Where`` on the same mask gives. An integer cast to float (uint8 pixels) stays data: paths.
    """
    if node.kind is OpKind.OPAQUE:
        pair = OPAQUE_RULES.get(node.attrs.get("op", ""))
        return None if pair is None else pair[mode == "paths"]
    if mode == "paths" and node.outputs and _predicate_derived(node):
        real = RULES.get(node.kind)
        return None if real is None else _index_derived(real)
    if mode == "paths" and node.outputs and all(is_index_data(v) for v in node.outputs):
        mode = "real"
    return (PATH_RULES if mode == "paths" else {}).get(node.kind) or RULES.get(node.kind)


def _predicate_derived(node: Node) -> bool:
    """A node reading index data only, a bool (a mask, a predicate) among it. An integer value
    cast to float alone is data entering the network (uint8 pixels), not a mask: it carries paths."""
    return bool(node.inputs) and all(is_index_data(v) for v in node.inputs) and any(v.dtype == "bool" for v in node.inputs)


def _index_derived(real: Rule) -> Rule:
    """The paths rule of a node that reads index data only: its real outputs, floats as zeros."""
    def rule(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.zeros_like(t, dtype=it.dtype) if t.is_floating_point() else t for t in real(it, node, args)]

    return rule


def is_index_data(value: Value) -> bool:
    """An integer or bool value: indices, positions or a mask, never a path carrier."""
    return not value.dtype.startswith(("float", "bfloat"))


def indexes_lookups_only(value: Value) -> bool:
    """True when every reader of ``value`` is an embedding lookup (it is only ever indices),
    directly, through data movement (``input_ids.view(-1, seq)``: a RESHAPE node) or through
    index arithmetic that the interpreter runs (RoBERTa's positions ``cumsum(ids != pad) * mask + pad``,
    BART's ``shift_tokens_right``: a scatter): a node whose outputs are all integer/bool and, in turn,
    only index lookups; or as the positions a gather picks (GPT-2's classifier pools its last non-pad token). Past the value itself, index data that nothing reads (an exporter's leftover
    ``shifted[:, 0]``) indexes nothing and is accepted."""
    return bool(value.uses) and _feeds_lookups_only(value)


def _feeds_lookups_only(value: Value) -> bool:
    def indexes(n: Node) -> bool:
        if n.kind is OpKind.OPAQUE and n.attrs.get("op") == "embedding":
            return n.inputs[0] is value
        if n.kind is OpKind.OPAQUE and n.attrs.get("op") in _PICKS and value is n.inputs[-1] and value is not n.inputs[0]:
            return True  # positions picked out of other data (a classifier's last non-pad token)
        if n.kind is OpKind.RESHAPE and n.inputs[0] is value:
            return _feeds_lookups_only(n.outputs[0])
        return (bool(n.outputs) and all(is_index_data(v) for v in n.outputs) and rule_for(n, "real") is not None
                and all(_feeds_lookups_only(v) for v in n.outputs))

    return all(indexes(n) for n in value.uses)


#: opaque index ops whose last input picks positions of the first (the picks carry no paths)
_PICKS = frozenset({"gather_elements", "gather_nd", "gather"})


def index_lookups(value: Value) -> list[Node]:
    """The embedding lookups that ``value`` indexes, directly or through RESHAPE nodes."""
    found: list[Node] = []
    for n in value.uses:
        if n.kind is OpKind.OPAQUE and n.attrs.get("op") == "embedding" and n.inputs[0] is value:
            found.append(n)
        elif n.kind is OpKind.RESHAPE and n.inputs[0] is value:
            found += index_lookups(n.outputs[0])
    return found


#: ONNX op types / torch module names of layers on the activations that paic has no semantics
#: for: no static input shape folds them away, so the re-export hint would mislead
_NO_SEMANTICS = frozenset({"LSTM", "GRU", "RNN", "EmbeddingBag", "Loop", "Scan",
                           "Hardmax", "Mean", "ReduceMin", "ReduceL1", "ReduceSumSquare", "ReduceProd", "ReduceLogSum",
                           "ReduceLogSumExp", "LpNormalization", "LpPool", "GlobalLpPool"})
#: random draws: in an exported network, dropout (or stochastic depth) left in training mode
_RANDOM = frozenset({"RandomUniformLike", "RandomNormalLike", "RandomUniform", "RandomNormal", "Bernoulli", "Multinomial"})


def no_rule_message(node: Node, mode: Mode) -> str:
    """One line: the node, why it is opaque, and what the user can do about it."""
    op_type = node.attrs.get("op_type", "") if node.kind is OpKind.OPAQUE else ""
    why = f": {node.attrs['reason']}" if node.attrs.get("reason") else ""
    where = f"node {node.name!r} ({node.kind.value}{'/' + op_type if op_type else ''}): cannot be evaluated ({mode} mode)"
    if node.attrs.get("fix"):  # the frontend knew what the user can do (a resize mode paic has no rule for)
        return f"{where}{why}; {node.attrs['fix']}"
    if op_type in _RANDOM:
        return (f"{where}: the model draws random numbers, i.e. it was exported in training mode (dropout); "
                "call model.eval() before exporting")
    if op_type in _NO_SEMANTICS:
        kind = "recurrent layers (LSTM, GRU, RNN)" if op_type in ("LSTM", "GRU", "RNN") else op_type
        return (f"{where}: paic has no semantics for {kind} yet; prune with a criterion that runs no forward pass "
                "(magnitude, random, random-erk) and write ONNX (-o X.onnx), which onnxruntime runs as is")
    return (f"{where}{why}; "
            "re-export with static input shapes (TorchScript: no dynamic_axes; dynamo: no dynamic_shapes) so it folds at "
            "compile time, or prune with a criterion that runs no forward pass (magnitude, random, random-erk)")
