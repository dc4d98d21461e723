"""Effective paths, weights, nodes and kernels: log P = log Σ_out ones-forward(M), per sample.

* ``log_paths`` — natural log of the exact number of input-element -> output-element paths
  through kept weights (:func:`~pai_compiler.passes.analysis.paths.count_paths`, ``exact``
  convention: pooling as a **sum**, float64, log-space scaling), summed over every output
  element; ``-inf`` when no path survives. One sample (:func:`sample_bindings`: the leading
  dim of every graph input is 1, other symbols come from ``bind``, default 1). A model
  exported with a fixed batch B > 1 (every input and output leads with the same static B) is
  run as is and both counts are divided by B: the B all-ones samples are identical and
  independent, so the total is exactly B times one sample's.
* ``log_paths_dpai`` — the DPaI reference quantity (``ref`` convention, algorithms.md §1.5):
  ``log Σ_out f(1) + Σ_l log max(x_l)`` with each weighted layer's input divided by its max
  and pooling as the model's own mean/max (here in float64). Exact on chains, skip-weighted
  on residual nets.
* A kept weight is **effective** iff it lies on ≥1 input->output path. This is decided with
  booleans only, never with small float gradients: a forward reachability sweep (the path rule
  of each node on 0/1 indicators, re-thresholded after every node), a backward sweep (the
  local autograd VJP of each node's path rule with 0/1 output indicators, re-thresholded at
  every node, in reverse topological order), then ``effective = kept ∧ ∂rule/∂W > 0`` with the
  forward indicators as input and the backward indicators as the VJP's cotangent. Every path rule
  is linear with non-negative coefficients on 0/1 operands: a true zero is computed exactly as
  0 and a positive count stays positive, so ``> 0`` is exact even in bfloat16.
* Products of two activations (attention's Q·Kᵀ and A·V, elementwise gating) follow the
  interpreter's **gate rule**: a path goes through one factor while the other acts as a unit
  gate, ``paths(A@B) = paths(A)@1 + 1@paths(B)``; so every attention projection carries paths.
* Per prunable Param (a weight shared by two nodes counts once): DPaI **nodes** = output
  channels (``out_axis``) with ≥1 effective weight; **kernels** = (out, in) pairs with ≥1
  effective weight (for linear: each effective weight); ``total_nodes`` = output channels.
  NPB **nodes** (§4.2) = input channels (``in_axis``, across groups) with ≥1 effective weight
  of every conv that is not a shortcut, plus, for linear layers, inputs + outputs with ≥1
  effective weight. A conv is a shortcut when its name/origin says ``shortcut``/``downsample``
  or when it is a 1×1 conv whose output reaches an ``add`` through norm/pointwise nodes only
  while its input also feeds another conv.

* An embedding lookup (an opaque node with ``op="embedding"``) is a path source like a float
  graph input of its output's shape: every output element starts one path and its integer
  indices carry none (the ones fed to an integer graph input are never read as indices).

Other opaque nodes have no path semantics: the pass raises a PaicError naming the node.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from pai_compiler.errors import PaicError
from pai_compiler.ir import Graph, Node, OpKind, Param
from pai_compiler.pass_infra import AnalysisManager, AnalysisPass
from pai_compiler.passes.analysis.bindings import parse_bind, sample_bindings, static_batch
from pai_compiler.passes.analysis.paths import Convention, count_paths, ones_inputs
from pai_compiler.progress import PHASE_DELAY, Phases, metric_bar

if TYPE_CHECKING:
    import torch

__all__ = ["NodePathPass", "NodePathResult", "LayerPaths", "is_shortcut"]

_THROUGH = (OpKind.NORM, OpKind.POINTWISE)


@dataclass(frozen=True)
class LayerPaths:
    """Path statistics of one prunable Param."""

    param: str
    nodes: tuple[str, ...]
    kind: str
    effective: np.ndarray = field(repr=False, compare=False)
    effective_params: int
    effective_nodes: int
    total_nodes: int
    effective_kernels: int
    npb_nodes: int
    shortcut: bool


@dataclass(frozen=True)
class NodePathResult:
    """Path counts and, per prunable Param, effective weights; totals sum over the layers."""

    log_paths: float
    log_paths_dpai: float
    layers: tuple[LayerPaths, ...]
    effective_params: int = 0
    effective_nodes: int = 0
    effective_nodes_npb: int = 0
    effective_kernels: int = 0
    total_nodes: int = 0
    #: float value name -> (elements on an input->output path, all elements) at the sample binding
    live_elements: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_layers(cls, log_paths: float, log_paths_dpai: float, layers: tuple[LayerPaths, ...],
                    live_elements: dict[str, tuple[int, int]] | None = None) -> NodePathResult:
        total = lambda key: sum(getattr(row, key) for row in layers)  # noqa: E731
        return cls(log_paths, log_paths_dpai, layers, total("effective_params"), total("effective_nodes"),
                   total("npb_nodes"), total("effective_kernels"), total("total_nodes"), dict(live_elements or {}))

    def layer(self, param: str) -> LayerPaths:
        for row in self.layers:
            if row.param == param:
                return row
        raise KeyError(param)

    def effective_masks(self) -> dict[str, np.ndarray]:
        return {row.param: row.effective for row in self.layers}


@dataclass(frozen=True)
class NodePathPass(AnalysisPass[NodePathResult]):
    """Exact log path count, DPaI log P̃, and effective weights/nodes/kernels per layer."""

    name: ClassVar[str] = "node-path"
    bind: str = ""

    def run(self, graph: Graph, am: AnalysisManager) -> NodePathResult:
        import torch  # heavy optional dependency

        for node in graph.nodes:
            if node.kind not in (OpKind.INPUT, OpKind.OUTPUT):
                _path_rule(node)  # refuse before any work
        bind = sample_bindings(graph, parse_bind(self.bind))
        per_sample = math.log(static_batch(graph))
        sweeps = 4 * sum(1 for n in graph.nodes if n.kind not in (OpKind.INPUT, OpKind.OUTPUT))
        with metric_bar(am.context.progress, "[bold]paths[/]", sweeps, unit="nodes", delay=PHASE_DELAY) as bar:
            phases = Phases(bar, sweeps, every=16)
            with torch.no_grad():
                phases.begin("log P (exact)")
                log_paths = _log_paths(graph, bind, "exact", phases) - per_sample
                phases.begin("log P (dpai)", f"log P {log_paths:.2f}")
                log_dpai = _log_paths(graph, bind, "ref", phases) - per_sample
            live: dict[str, tuple[int, int]] = {}
            phases.begin("effective weights", f"log P {log_paths:.2f}")
            try:
                reached = _weight_reachability(graph, bind, live=live, on_node=phases.tick)
            except (PaicError, NotImplementedError, RuntimeError):
                # some kernels (e.g. 3-d pooling) have no bfloat16 version: float32 is exact too
                live.clear()
                reached = _weight_reachability(graph, bind, dtype=torch.float32, live=live, on_node=phases.tick)
            phases.finish(f"log P {log_paths:.2f}")
        rows = []
        for param, users in _prunable_layers(graph):
            effective = reached[param.name] if param.mask is None else param.mask & reached[param.name]
            rows.append(_layer_stats(param, users, effective))
        return NodePathResult.from_layers(log_paths, log_dpai, tuple(rows), live)


def _log_paths(graph: Graph, bind: dict[str, int], convention: Convention, phases: Phases | None = None) -> float:
    """One float64 ones-forward; each layer's 0/1 operand is built when it runs and every value is
    freed after its last use, so memory stays at one layer plus live activations (``phases``: ticked per node)."""
    import torch  # heavy optional dependency: only the path analysis needs it

    tick = None if phases is None else (lambda node, outputs: phases.tick())
    return float(count_paths(graph, convention, bind, dtype=torch.float64, keep_values=False, distinct_rows=True, on_node=tick).log_paths)


def _path_rule(node: Node) -> Any:
    from pai_compiler.interp import rule_for  # imports torch

    rule = rule_for(node, "paths")
    if rule is None and node.kind is OpKind.OPAQUE:
        raise PaicError(f"node-path: node {node.name!r} is opaque ({node.attrs.get('op_type', '?')}): paths through it are undefined")
    if rule is None:
        raise PaicError(f"node-path: node {node.name!r} ({node.kind.value}) has no path rule")
    return rule


def _weight_reachability(graph: Graph, bind: dict[str, int], dtype: Any = None, live: dict[str, tuple[int, int]] | None = None,
                         on_node: Callable[[], None] | None = None) -> dict[str, np.ndarray]:
    """``∂(path rule)/∂W > 0`` per prunable weight, from 0/1 forward indicators and 0/1 output grads.

    ``live`` (filled when given): per boolean-indicator value, (elements reached from an input
    that reach an output, all elements), counted once its cotangent is complete. ``on_node()`` is
    called after each node of either sweep (a progress tick).

    Two sweeps keep memory at the activations plus one layer: the forward sweep (no autograd)
    stores each value's 0/1 indicator; the backward sweep re-runs one node at a time with
    autograd on its inputs and its weights' 0/1 operands, thresholds the weight gradients to
    booleans at once, and frees every indicator and cotangent after its last use.
    """
    import torch  # heavy optional dependency: only the path analysis needs it

    from pai_compiler.interp import Interpreter  # imports torch

    dtype = dtype or _indicator_dtype()
    params = {p.name: p for p, _ in _prunable_layers(graph)}
    it = Interpreter(graph, mode="paths", dtype=dtype, pool="sum", bind=bind, distinct_rows=True)
    inputs = [v.name for v in graph.inputs]
    forward: dict[str, torch.Tensor] = dict(zip(inputs, ones_inputs(graph, bind, dtype)))
    nodes = [n for n in graph.nodes if n.kind not in (OpKind.INPUT, OpKind.OUTPUT)]
    first_use: dict[str, int] = {}
    # NNPACK's Winograd/FFT convolutions would mix signs; direct/GEMM kernels keep 0 exact
    with torch.no_grad(), torch.backends.nnpack.flags(enabled=False):
        for index, node in enumerate(nodes):
            for v in node.inputs:
                first_use.setdefault(v.name, index)
            outs = _path_rule(node)(it, node, [_unpack(forward[v.name], dtype) for v in node.inputs])
            for v, t in zip(node.outputs, outs):
                forward[v.name] = t > 0 if t.is_floating_point() else t  # counts >= 0: kept as booleans (1 byte)
            if on_node is not None:
                on_node()
    backward: dict[str, Any] = {}
    for v in graph.outputs:
        backward[v.name] = backward.get(v.name, 0) + torch.ones(forward[v.name].shape, dtype=dtype)
    reached = {name: np.zeros(p.shape, dtype=bool) for name, p in params.items()}
    graph_inputs = set(inputs)
    with torch.enable_grad(), torch.backends.nnpack.flags(enabled=False):
        for index in range(len(nodes) - 1, -1, -1):
            node = nodes[index]
            cotangents = [backward.pop(v.name, None) for v in node.outputs]
            if live is not None:
                for v, g in zip(node.outputs, cotangents):
                    if v.name not in first_use:  # no consumer left to add to its cotangent
                        _count_live(live, v.name, forward.get(v.name), g)
            if any(g is not None and bool(g.any()) for g in cotangents):
                _node_vjp(it, node, forward, cotangents, graph_inputs, params, reached, backward, dtype)
            for v in node.inputs:
                if first_use.get(v.name) == index and v.name in forward:
                    if live is not None:  # every consumer has run: the cotangent is complete
                        _count_live(live, v.name, forward[v.name], backward.get(v.name))
                    forward.pop(v.name)
            if on_node is not None:
                on_node()
    return reached


def _count_live(live: dict[str, tuple[int, int]], name: str, reached: Any, cotangent: Any) -> None:
    """Record (elements reached forward with a nonzero cotangent, numel) of a boolean indicator."""
    import torch  # heavy optional dependency

    if reached is None or reached.dtype != torch.bool:
        return
    if cotangent is None:
        live[name] = (0, reached.numel())
        return
    live[name] = (int((reached & (cotangent != 0)).sum()), reached.numel())


def _node_vjp(it: Any, node: Node, forward: dict[str, Any], cotangents: list[Any], graph_inputs: set[str],
              params: dict[str, Param], reached: dict[str, np.ndarray], backward: dict[str, Any], dtype: Any) -> None:
    """Re-run ``node`` with autograd; add its input cotangents to ``backward``, OR its weight grads > 0 into ``reached``."""
    import torch  # heavy optional dependency

    if _pass_through(node, forward, cotangents, graph_inputs, backward):
        return
    args = [_unpack(forward[v.name], dtype) for v in node.inputs]
    args = [a if v.name in graph_inputs or not a.is_floating_point() else a.requires_grad_() for v, a in zip(node.inputs, args)]
    # the interpreter's own paths-mode operand (mask, or ones), fresh: it.weights is empty here
    leaves = {p.name: it.weight(p).requires_grad_() for p in node.params.values() if p.name in params}
    it.weights = leaves
    try:
        outs = _path_rule(node)(it, node, args)
    finally:
        it.weights = {}
    pairs = [(t, g.sign()) for t, g in zip(outs, cotangents) if g is not None and t.requires_grad]
    targets = [a for a in args if a.requires_grad] + list(leaves.values())
    if not pairs or not targets:
        return
    # VJP through a scalar: grad_outputs= would import torch.fx's symbolic shapes (~1 s)
    got = torch.autograd.grad(sum((t * g).sum() for t, g in pairs), targets, allow_unused=True)
    grad_inputs = [v for v, a in zip(node.inputs, args) if a.requires_grad]
    for v, g in zip(grad_inputs, got[: len(grad_inputs)]):
        if g is not None:
            backward[v.name] = backward[v.name] + g if v.name in backward else g
    for name, g in zip(leaves, got[len(grad_inputs):]):
        if g is not None:
            reached[name] |= (g > 0).numpy()


def _pass_through(node: Node, forward: dict[str, Any], cotangents: list[Any], graph_inputs: set[str], backward: dict[str, Any]) -> bool:
    """The VJP of an identity path rule (norm, activation, softmax) without autograd: its input's
    cotangent gains the output's, ``sign(g)``, exactly what autograd gives. False (autograd does
    it) when the rule is another, broadcasts, or the input is not a 0/1 indicator."""
    import torch  # heavy optional dependency

    from pai_compiler.interp_rules import path_identity  # imports torch

    if len(node.inputs) != 1 or len(cotangents) != 1 or _path_rule(node) is not path_identity:
        return False
    v, g = node.inputs[0], cotangents[0]
    x = forward.get(v.name)
    if x is None or g is None or v.name in graph_inputs or x.dtype != torch.bool or tuple(x.shape) != tuple(g.shape):
        return False
    step = g.sign()
    backward[v.name] = backward[v.name] + step if v.name in backward else step
    return True


def _unpack(t: torch.Tensor, dtype: Any) -> torch.Tensor:
    """A stored indicator as a 0/1 operand (booleans become ``dtype``; others pass through)."""
    import torch  # heavy optional dependency

    return t.to(dtype, memory_format=torch.contiguous_format) if t.dtype == torch.bool else t


def _indicator_dtype() -> Any:
    """bfloat16 where the CPU has native bf16 GEMM (≈2× faster), else float32.

    Both are exact here: every path rule sums non-negative products of 0/1 values, so a true 0
    is computed as exactly 0 and a true count ≥ 1 stays positive (≥ 1 - 2⁻⁸) whatever the
    rounding or summation order; ``sign`` is therefore the exact reachability indicator.
    """
    import torch  # heavy optional dependency

    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # older torch
        native = False
    return torch.bfloat16 if native else torch.float32


def _prunable_layers(graph: Graph) -> list[tuple[Param, list[Node]]]:
    """Each layer weight (``graph.layer_params()``: the prunable ones and a tied head kept dense) and its nodes."""
    layers = {id(p) for p in graph.layer_params()}
    seen: dict[int, tuple[Param, list[Node]]] = {}
    for node in graph.layer_nodes():
        for p in node.params.values():
            if id(p) in layers:
                seen.setdefault(id(p), (p, []))[1].append(node)
    return list(seen.values())


def _layer_stats(param: Param, users: list[Node], effective: np.ndarray) -> LayerPaths:
    oi = param.to_oi(effective)
    n_out = oi.shape[0]
    n_in = oi.shape[1] if param.in_axis is not None else 1
    pairs = oi.reshape(n_out, n_in, -1).any(axis=2)  # (out, in): one pass over the weight
    per_out = pairs.any(axis=1)
    node = users[0]
    shortcut = node.kind is OpKind.CONV and is_shortcut(node, param)
    if node.kind is OpKind.CONV:
        npb = 0 if shortcut else int(_conv_input_channels(pairs, int(node.attrs.get("groups", 1))).sum())
    else:
        npb = int(per_out.sum()) + (int(pairs.any(axis=0).sum()) if param.in_axis is not None else 0)
    return LayerPaths(
        param=param.name, nodes=tuple(n.name for n in users), kind=node.kind.value, effective=effective,
        effective_params=int(np.count_nonzero(effective)), effective_nodes=int(per_out.sum()), total_nodes=n_out,
        effective_kernels=int(pairs.sum()) if param.in_axis is not None else int(per_out.sum()), npb_nodes=npb, shortcut=shortcut,
    )


def _conv_input_channels(pairs: np.ndarray, groups: int) -> np.ndarray:
    """Which real input channels (across groups) carry ≥1 effective weight; ``pairs`` is (out, in/groups)."""
    n_out, in_per_group = pairs.shape
    return pairs.reshape(groups, n_out // groups, in_per_group).any(axis=1).reshape(-1)


def is_shortcut(node: Node, param: Param) -> bool:
    """A residual projection: named so, or a 1×1 conv feeding an add beside another conv path."""
    label = f"{param.name} {param.origin} {node.name} {node.origin}".lower()
    if "shortcut" in label or "downsample" in label:
        return True
    if node.kind is not OpKind.CONV or math.prod(node.attrs.get("kernel_shape", [0])) != 1:
        return False
    if not _reaches(node.outputs[0], lambda n: n.kind is OpKind.ADD, _THROUGH):
        return False
    x = node.inputs[0]
    through = (*_THROUGH, OpKind.POOL, OpKind.RESHAPE)
    return any(
        u is not node and (u.kind is OpKind.CONV or _reaches(u.outputs[0], lambda n: n.kind is OpKind.CONV, through))
        for u in x.uses if u.kind is OpKind.CONV or u.kind in through
    )


def _reaches(start: Any, goal: Any, through: tuple[OpKind, ...]) -> bool:
    stack, seen = [start], set()
    while stack:
        v = stack.pop()
        for u in v.uses:
            if goal(u):
                return True
            if u.kind in through and id(u) not in seen:
                seen.add(id(u))
                stack.extend(u.outputs)
    return False
