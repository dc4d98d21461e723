"""Torch interpreter of the IR: ``run(inputs) -> InterpResult``, in two semantics selected by ``mode``.

* ``real``: the model's own function (masked weights ``W * M``), the torch reference for
  ONNX Runtime equivalence and the forward of data-driven criteria (SNIP, GraSP, SynFlow).
* ``paths``: the ones-forward that counts input->output paths through binary masks: conv /
  linear / matmul with the mask as weight and no bias, norms, activations, softmax and
  constants-as-bias as identity, data constants as zero (they carry no path), pooling as a
  **sum** (``pool="sum"``) or as the model's own mean/max (``pool="model"``), residual adds
  summing; integer/bool values (ids, positions, masks) carry no paths, and a float computed from
  them alone with a bool among them (a mask as an additive bias) is a data constant (zeros); an
  integer cast to float (uint8 pixels) is data and carries paths. A product of two
  activations (``matmul`` such as attention's Q.K^T and A.V, or an elementwise ``mul``/``div``) follows the *gate rule*: a path goes through one factor while
  the other acts as a unit gate, so ``paths(A@B) = paths(A)@1 + 1@paths(B)`` and
  ``paths(a*b) = paths(a) + paths(b)``. Every attention weight (query, key, value, output)
  thus carries paths, and a class token (a constant) receives paths through its keys.

The rules are picked per ``OpKind`` from ``RULES`` / ``PATH_RULES`` (bodies in
:mod:`pai_compiler.interp_rules`). Opaque nodes are evaluated only when ``attrs["op"]`` names a
rule in ``OPAQUE_RULES`` (see :func:`rule_for`); every other opaque node stops the interpreter
with a ``PaicError``. Such ops: ``op="shape_data"`` (a tensor computed from the bound sizes
only, e.g. positions or masks: its ``ShapeProgram``; in paths mode a float one is zeros),
``op="gather"`` (an activation gathered by run-time indices: values and counts alike),
``op="where"`` (ONNX Where; paths: either branch's counts, summed) and the **embedding lookup** (``op="embedding"``: the rows
of a constant, non-prunable ``table`` Param picked along ``axis`` by a dynamic integer input,
ONNX ``Gather`` semantics, negative indices included). In ``real`` mode it is the lookup
(``lookup="ones"`` makes it output ones instead: SynFlow's all-ones input); in ``paths`` mode
its output is a *path source*, exactly like a float graph input of the output's shape: all
ones whatever the indices, and nothing flows back into the indices or the table.

``scaling`` keeps large counts finite: ``"exact"`` stores each value as ``t * exp(s)`` with
``t`` renormalised to max 1 after every node (scale detached, so gradients of the log count
are exact; ``InterpResult.output_log_scales`` holds each output's ``s``); ``"dpai"`` divides
every weighted layer's input by its (non-detached) max and adds ``sum(log max)`` back, as the
DPaI reference code does (skip-weighted on residual nets; ``InterpResult.log_scale``).

``distinct_rows=True`` computes a linear layer once per run of equal consecutive input rows (an
all-ones forward gives a transformer's patch tokens equal rows): with ``d`` the distinct rows and
``inverse`` each row's run, ``y = (d · Wᵀ)[inverse]``; backward keeps each row's own input gradient
``dy · W`` and sums equal rows' output gradients for the weight, ``dW = (Σ_{i: inverse_i = r} dy_i)ᵀ · d_r``.
The same function and gradients as ``F.linear``, on GEMMs ~100× smaller for ViT-B/16.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import sympy
import torch
import torch.nn.functional as F

from pai_compiler.errors import PaicError
from pai_compiler.interp_rules import (
    add, attention, broadcast_operands, compare, constant, cumsum, embedding, gather_along, gather_nd, path_add, path_embedding, path_identity,
    path_mul, pad_spatial, dynamic_gather, path_shape_data, path_where, pool, real_mul, real_norm, real_pointwise, reshape, shape_data, split, where,
)
from pai_compiler.ir import Graph, Node, OpKind, Param, Value

__all__ = [
    "Interpreter", "InterpResult", "NodeEvaluation", "bound_dims", "conv_forward", "param_tensor", "torch_ready",
    "is_float_array", "rule_for", "is_index_data", "indexes_lookups_only", "index_lookups", "RULES", "PATH_RULES", "OPAQUE_RULES", "Rule",
]

Mode = Literal["real", "paths"]
Rule = Callable[["Interpreter", Node, list[torch.Tensor]], list[torch.Tensor]]


def torch_ready(data: Any) -> np.ndarray:
    """``data`` as an array torch can take: ml_dtypes floats (bfloat16, float8_*: numpy kind
    ``V``, which torch rejects) become float32, and read-only views are copied."""
    data = np.asarray(data)
    if data.dtype.kind == "V":
        return data.astype(np.float32)
    return data if data.flags.writeable else data.copy()


def is_float_array(data: Any) -> bool:
    """True for numpy floats and ml_dtypes' low-precision floats."""
    return np.asarray(data).dtype.kind in "fV"


def param_tensor(p: Param, dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    return torch.as_tensor(torch_ready(p.data), device=device).to(dtype)


def bound_dims(shape: Any, bind: Mapping[str, int]) -> list[int]:
    """Concrete sizes of a (possibly symbolic) shape; a symbol missing from ``bind`` is a PaicError."""
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        else:
            value = sympy.sympify(d).subs({sympy.Symbol(k, integer=True, positive=True): v for k, v in bind.items()})
            if value.is_number and value.is_finite and float(value).is_integer():  # 0.0: a size computed in float, no symbol left
                value = sympy.Integer(int(value))
            if not value.is_Integer:
                raise PaicError(f"dimension {d} is not bound; pass --bind {d}=N")
            out.append(int(value))
    return out


@dataclass(frozen=True)
class InterpResult:
    """What one ``Interpreter.run`` computed.

    ``output_log_scales[i]`` is output i's log scale (``scaling="exact"``: the true value is
    ``outputs[i] * exp(scale)``; 0 otherwise); ``log_scale`` is ``sum(log max)`` over the
    rescaled inputs (``scaling="dpai"``; 0 otherwise); ``values`` holds every value by name
    (with ``keep_values=False`` only those never consumed); ``inner_values`` holds values
    inside fused nodes, e.g. ``"<attention node>/out_proj_input"`` (``keep_values=True`` only).
    """

    outputs: tuple[torch.Tensor, ...]
    output_log_scales: tuple[torch.Tensor | float, ...]
    log_scale: torch.Tensor
    values: Mapping[str, torch.Tensor] = field(repr=False)
    inner_values: Mapping[str, torch.Tensor] = field(repr=False)


@dataclass(frozen=True)
class NodeEvaluation:
    """One node's outputs, plus what a fused node reports beside them (attention: its DPaI log scale, its inner values)."""

    outputs: tuple[torch.Tensor, ...]
    log_scale: torch.Tensor | None = None
    inner_values: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _RunState:
    """The live values of one run and their scales (``exact``), the DPaI log term, the outputs so far."""

    dpai_log: torch.Tensor
    env: dict[str, torch.Tensor] = field(default_factory=dict)
    scale: dict[str, Any] = field(default_factory=dict)
    inner: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: list[torch.Tensor] = field(default_factory=list)
    out_scales: list[Any] = field(default_factory=list)


class Interpreter:
    """Evaluate a Graph with torch. ``weights`` overrides prunable weights by param name.

    ``weights`` is read, not copied: a lazy mapping builds each weight when a node asks for it.
    """

    def __init__(
        self,
        graph: Graph,
        *,
        mode: Mode = "real",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        weights: Mapping[str, torch.Tensor] | None = None,
        pool: Literal["sum", "model"] = "sum",
        scaling: Literal["none", "exact", "dpai"] = "none",
        bind: Mapping[str, int] | None = None,
        lookup: Literal["table", "ones"] = "table",
        distinct_rows: bool = False,
    ) -> None:
        self.graph = graph
        self.mode = mode
        self.dtype = dtype
        self.device = device
        self.weights: Mapping[str, torch.Tensor] = weights if weights is not None else {}
        self.pool = pool
        self.scaling = scaling
        self.user_bind = dict(bind or {})
        self.bind = dict(self.user_bind)
        self.lookup = lookup  # real mode: "ones" makes every embedding lookup a path source
        # linear layers multiply each distinct input row once: an all-ones forward gives a
        # transformer's tokens equal counts, so ~197 rows become ~2
        self.distinct_rows = distinct_rows
        self._const_cache: dict[int, torch.Tensor] = {}

    # ---- parameters --------------------------------------------------------------------
    def weight(self, p: Param) -> torch.Tensor:
        """The operand for a weight: override, else mask (paths) or masked data (real)."""
        if p.name in self.weights:
            return self.weights[p.name]
        if self.mode == "paths":  # cheap to rebuild; caching would hold a float copy of every weight
            if p.prunable and p.mask is not None:
                return torch.as_tensor(p.mask, device=self.device).to(self.dtype)
            return torch.ones(p.shape, dtype=self.dtype, device=self.device)
        key = id(p)
        if key not in self._const_cache:
            t = param_tensor(p, self.dtype if is_float_array(p.data) else torch.int64, self.device)
            if p.mask is not None:
                t = t * torch.as_tensor(p.mask, device=self.device).to(t.dtype)
            self._const_cache[key] = t
        return self._const_cache[key]

    def oi_weight(self, p: Param) -> torch.Tensor:
        """Weight with axes (out, in, rest...), as conv and linear expect."""
        w = self.weight(p)
        axes = [p.out_axis] + ([p.in_axis] if p.in_axis is not None else [])
        rest = [a for a in range(w.dim()) if a not in axes]
        order = axes + rest
        return w if order == list(range(w.dim())) else w.permute(order)

    def const(self, p: Param) -> torch.Tensor:
        key = id(p)
        if key not in self._const_cache:
            dt = self.dtype if is_float_array(p.data) else None
            t = param_tensor(p, dt or torch.int64, self.device) if dt else torch.as_tensor(np.asarray(p.data).copy(), device=self.device)
            self._const_cache[key] = t
        return self._const_cache[key]

    def dims(self, shape: Any) -> list[int]:
        return bound_dims(shape, self.bind)

    # ---- running -----------------------------------------------------------------------
    def _bind_inputs(self, inputs: list[torch.Tensor]) -> None:
        """Bind symbolic input dims to this run's sizes (user bindings for other symbols stay)."""
        self.bind = dict(self.user_bind)
        for v, t in zip(self.graph.inputs, inputs):
            if v.shape is None:
                continue
            for d, size in zip(v.shape, t.shape):
                if not isinstance(d, int) and isinstance(d, sympy.Symbol):
                    self.bind.setdefault(d.name, int(size))

    def run(
        self,
        inputs: list[torch.Tensor],
        *,
        on_node: Callable[[Node, list[torch.Tensor]], None] | None = None,
        keep_values: bool = True,
    ) -> InterpResult:
        """Evaluate the graph; ``keep_values=False`` frees each value after its last use
        (the result's ``values`` then hold only what was never consumed)."""
        graph_inputs = self.graph.inputs
        if len(inputs) != len(graph_inputs):
            raise PaicError(f"model has {len(graph_inputs)} inputs, got {len(inputs)}")
        self._bind_inputs(inputs)
        state = _RunState(torch.zeros((), dtype=self.dtype, device=self.device))
        feed = dict(zip([v.name for v in graph_inputs], inputs))
        dies_after = {} if keep_values else _last_uses(self.graph.nodes)
        for index, node in enumerate(self.graph.nodes):
            if node.kind is OpKind.INPUT:
                t = feed[node.outputs[0].name].to(self.device)
                state.env[node.outputs[0].name] = t.to(self.dtype) if t.is_floating_point() else t
                state.scale[node.outputs[0].name] = 0.0
                continue
            if node.kind is OpKind.OUTPUT:
                state.outputs.append(state.env[node.inputs[0].name])
                state.out_scales.append(state.scale.get(node.inputs[0].name, 0.0))
                continue
            outs = self._step(node, state, keep_values)
            if on_node is not None:
                on_node(node, list(outs))
            for name in dies_after.get(index, ()):
                state.env.pop(name, None)
                state.scale.pop(name, None)
        return InterpResult(tuple(state.outputs), tuple(state.out_scales), state.dpai_log, state.env, state.inner)

    def evaluate(self, node: Node, args: list[torch.Tensor]) -> NodeEvaluation:
        """One node's rule on ``args`` (already scaled); a fused attention node also reports its
        DPaI log scale and the input of its ``out_proj``."""
        if node.kind is OpKind.ATTENTION:
            parts = attention(self, node, args, paths=self.mode == "paths")
            return NodeEvaluation((parts.output,), parts.log_scale, {f"{node.name}/out_proj_input": parts.out_proj_input})
        rule = rule_for(node, self.mode)
        if rule is None:
            raise PaicError(_no_rule_message(node, self.mode))
        return NodeEvaluation(tuple(rule(self, node, args)))

    def _step(self, node: Node, state: _RunState, keep_values: bool) -> tuple[torch.Tensor, ...]:
        """Scale ``node``'s inputs, evaluate it, store its outputs (with their scales) in ``state``."""
        args = [state.env[v.name] for v in node.inputs]
        node_scale: Any = 0.0
        if self.scaling == "exact" and args:
            args, node_scale = self._align(node, args, [state.scale[v.name] for v in node.inputs])
        if self.scaling == "dpai" and node.kind in (OpKind.CONV, OpKind.LINEAR, OpKind.ATTENTION):
            m = args[0].max()
            if m > 0:
                args = [args[0] / m, *args[1:]]
                state.dpai_log = state.dpai_log + torch.log(m)
        try:
            evaluation = self.evaluate(node, args)
        except PaicError:
            raise
        except (RuntimeError, NotImplementedError, ValueError, TypeError, IndexError) as exc:
            detail = " ".join(str(exc).split())[:200]
            raise PaicError(f"node {node.name!r} ({node.kind.value}): cannot be evaluated in torch ({self.mode} mode): {detail}") from exc
        if evaluation.log_scale is not None:  # a rule that rescales inside a node (attention, dpai)
            state.dpai_log = state.dpai_log + evaluation.log_scale
        if keep_values:
            state.inner.update(evaluation.inner_values)
        for v, t in zip(node.outputs, evaluation.outputs):
            state.scale[v.name] = node_scale
            if self.scaling == "exact" and t.is_floating_point():
                m = t.detach().abs().max() if t.numel() else torch.zeros(())
                if m > 0:
                    t = t / m
                    state.scale[v.name] = node_scale + torch.log(m)
            state.env[v.name] = t
        return evaluation.outputs

    def _align(self, node: Node, args: list[torch.Tensor], scales: list[Any]) -> tuple[list[torch.Tensor], Any]:
        if len(args) == 1:
            return args, scales[0]
        floats = [s for a, s in zip(args, scales) if a.is_floating_point()] or scales  # indices and conditions keep their values
        ref = max(floats, key=lambda s: float(s))
        aligned = [a if float(s) == float(ref) or not a.is_floating_point() else a * torch.exp(torch.as_tensor(s - ref, dtype=a.dtype))
                   for a, s in zip(args, scales)]
        return aligned, ref


#: ONNX op types / torch module names of layers on the activations that paic has no semantics
#: for: no static input shape folds them away, so the re-export hint would mislead
_NO_SEMANTICS = frozenset({"LSTM", "GRU", "RNN", "ConvTranspose", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
                           "EmbeddingBag", "Loop", "Scan", "DepthToSpace", "SpaceToDepth", "PixelShuffle", "PixelUnshuffle"})


def _no_rule_message(node: Node, mode: Mode) -> str:
    """One line: the node, why it is opaque, and what the user can do about it."""
    op_type = node.attrs.get("op_type", "") if node.kind is OpKind.OPAQUE else ""
    why = f": {node.attrs['reason']}" if node.attrs.get("reason") else ""
    where = f"node {node.name!r} ({node.kind.value}{'/' + op_type if op_type else ''}): cannot be evaluated ({mode} mode)"
    if op_type in _NO_SEMANTICS:
        kind = "recurrent layers (LSTM, GRU, RNN)" if op_type in ("LSTM", "GRU", "RNN") else op_type
        return (f"{where}: paic has no semantics for {kind} yet; prune with a criterion that runs no forward pass "
                "(magnitude, random, random-erk) and write ONNX (-o X.onnx), which onnxruntime runs as is")
    return (f"{where}{why}; "
            "re-export with static input shapes (TorchScript: no dynamic_axes; dynamo: no dynamic_shapes) so it folds at "
            "compile time, or prune with a criterion that runs no forward pass (magnitude, random, random-erk)")


def _last_uses(nodes: list[Node]) -> dict[int, list[str]]:
    """Node index -> names of the values whose last reader (or producer, if unread) it is."""
    last: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for v in node.outputs:
            last.setdefault(v.name, index)
        for v in node.inputs:
            last[v.name] = index
    dies: dict[int, list[str]] = {}
    for name, index in last.items():
        dies.setdefault(index, []).append(name)
    return dies


# ---- rule tables (bodies in interp_rules; conv and linear here) ---------------------------
def conv_forward(it: Interpreter, node: Node, args: list[torch.Tensor], *, bias: bool = True) -> list[torch.Tensor]:
    """A conv node's real output on ``args[0]`` (masked weights; ``bias=False`` leaves the bias out)."""
    x = pad_spatial(args[0], node.attrs["pads"])
    w = it.oi_weight(node.params["weight"])
    b = it.weight(node.params["bias"]) if bias and "bias" in node.params else None
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(w.dim() - 2)
    if conv is None:
        raise PaicError(f"conv {node.name!r}: {w.dim() - 2}-d convolution is not supported")
    return [conv(x, w, b, stride=node.attrs["strides"], dilation=node.attrs["dilations"], groups=node.attrs["groups"])]


def _linear(it: Interpreter, node: Node, args: list[torch.Tensor], *, bias: bool = True) -> list[torch.Tensor]:
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
    "gather_elements": (gather_along, gather_along),
    "gather_nd": (gather_nd, gather_nd),
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
    def rule(it: Interpreter, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.zeros_like(t, dtype=it.dtype) if t.is_floating_point() else t for t in real(it, node, args)]

    return rule


def is_index_data(value: Value) -> bool:
    """An integer or bool value: indices, positions or a mask, never a path carrier."""
    return not value.dtype.startswith(("float", "bfloat"))


def indexes_lookups_only(value: Value) -> bool:
    """True when every reader of ``value`` is an embedding lookup (it is only ever indices),
    directly, through data movement (``input_ids.view(-1, seq)``: a RESHAPE node) or through
    index arithmetic that the interpreter runs (RoBERTa's positions ``cumsum(ids != pad) * mask + pad``):
    a node whose outputs are all integer/bool and, in turn, only index lookups."""
    def indexes(n: Node) -> bool:
        if n.kind is OpKind.OPAQUE and n.attrs.get("op") == "embedding":
            return n.inputs[0] is value
        if n.kind is OpKind.RESHAPE and n.inputs[0] is value:
            return indexes_lookups_only(n.outputs[0])
        return (bool(n.outputs) and all(is_index_data(v) for v in n.outputs) and rule_for(n, "real") is not None
                and all(indexes_lookups_only(v) for v in n.outputs))

    return bool(value.uses) and all(indexes(n) for n in value.uses)


def index_lookups(value: Value) -> list[Node]:
    """The embedding lookups that ``value`` indexes, directly or through RESHAPE nodes."""
    found: list[Node] = []
    for n in value.uses:
        if n.kind is OpKind.OPAQUE and n.attrs.get("op") == "embedding" and n.inputs[0] is value:
            found.append(n)
        elif n.kind is OpKind.RESHAPE and n.inputs[0] is value:
            found += index_lookups(n.outputs[0])
    return found
