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

The rule of each node comes from :func:`~pai_compiler.interp_tables.rule_for` (the tables
``RULES`` / ``PATH_RULES`` / ``OPAQUE_RULES`` and the opaque ops it evaluates are described
there); a node without one stops the interpreter with a ``PaicError`` naming it.

``scaling`` keeps large counts finite: ``"exact"`` stores each value as ``t * exp(s)`` with
``t`` renormalised to max 1 after every node (scale detached, so gradients of the log count
are exact; ``InterpResult.output_log_scales`` holds each output's ``s``); ``"dpai"`` divides
every weighted layer's input by its (non-detached) max and adds ``sum(log max)`` back, as the
DPaI reference code does (skip-weighted on residual nets; ``InterpResult.log_scale``).

``distinct_rows=True`` computes a linear layer once per run of equal consecutive input rows
(:mod:`pai_compiler.interp_tables`): the same function and gradients as ``F.linear``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import sympy
import torch

from pai_compiler.errors import PaicError
from pai_compiler.interp_path_rules import attention
from pai_compiler.interp_tables import Mode, no_rule_message, rule_for
from pai_compiler.ir import WEIGHTED_KINDS, Graph, Node, OpKind, Param

__all__ = ["Interpreter", "InterpResult", "NodeEvaluation", "bound_dims", "param_tensor", "torch_ready", "is_float_array"]


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
            raise PaicError(no_rule_message(node, self.mode))
        return NodeEvaluation(tuple(rule(self, node, args)))

    def _step(self, node: Node, state: _RunState, keep_values: bool) -> tuple[torch.Tensor, ...]:
        """Scale ``node``'s inputs, evaluate it, store its outputs (with their scales) in ``state``."""
        args = [state.env[v.name] for v in node.inputs]
        node_scale: Any = 0.0
        if self.scaling == "exact" and args:
            args, node_scale = self._align(node, args, [state.scale[v.name] for v in node.inputs])
        if self.scaling == "dpai" and node.kind in WEIGHTED_KINDS:
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
