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
* A kept weight is **effective** iff it lies on ≥1 input->output path, decided with booleans
  only (:mod:`~pai_compiler.passes.analysis.reachability`: a forward and a backward 0/1 sweep,
  then ``effective = kept ∧ ∂rule/∂W > 0``; exact even in bfloat16).
* Products of two activations (attention's Q·Kᵀ and A·V, elementwise gating) follow the
  interpreter's **gate rule**: a path goes through one factor while the other acts as a unit
  gate, ``paths(A@B) = paths(A)@1 + 1@paths(B)``; so every attention projection carries paths.
* Per prunable Param (a weight shared by two nodes counts once): DPaI **nodes**, **kernels**,
  ``total_nodes`` and NPB **nodes** with shortcut convs left out
  (:mod:`~pai_compiler.passes.analysis.layer_paths`).

* An embedding lookup (an opaque node with ``op="embedding"``) is a path source like a float
  graph input of its output's shape: every output element starts one path and its integer
  indices carry none (the ones fed to an integer graph input are never read as indices).

Other opaque nodes have no path semantics: the pass raises a PaicError naming the node.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from pai_compiler.errors import PaicError
from pai_compiler.ir import Graph, OpKind
from pai_compiler.pass_infra import AnalysisManager, AnalysisPass
from pai_compiler.passes.analysis.bindings import parse_bind, sample_bindings, static_batch
from pai_compiler.passes.analysis.layer_paths import LayerPaths, layer_stats, prunable_layers
from pai_compiler.passes.analysis.paths import Convention, count_paths
from pai_compiler.passes.analysis.reachability import path_rule, weight_reachability
from pai_compiler.progress import PHASE_DELAY, Phases, metric_bar

__all__ = ["NodePathPass", "NodePathResult"]


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
                path_rule(node)  # refuse before any work
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
                reached = weight_reachability(graph, bind, live=live, on_node=phases.tick)
            except (PaicError, NotImplementedError, RuntimeError):
                # some kernels (e.g. 3-d pooling) have no bfloat16 version: float32 is exact too
                live.clear()
                reached = weight_reachability(graph, bind, dtype=torch.float32, live=live, on_node=phases.tick)
            phases.finish(f"log P {log_paths:.2f}")
        rows = []
        for param, users in prunable_layers(graph):
            effective = reached[param.name] if param.mask is None else param.mask & reached[param.name]
            rows.append(layer_stats(param, users, effective))
        return NodePathResult.from_layers(log_paths, log_dpai, tuple(rows), live)


def _log_paths(graph: Graph, bind: dict[str, int], convention: Convention, phases: Phases | None = None) -> float:
    """One float64 ones-forward; each layer's 0/1 operand is built when it runs and every value is
    freed after its last use, so memory stays at one layer plus live activations (``phases``: ticked per node)."""
    import torch  # heavy optional dependency: only the path analysis needs it

    tick = None if phases is None else (lambda node, outputs: phases.tick())
    return float(count_paths(graph, convention, bind, dtype=torch.float64, keep_values=False, distinct_rows=True, on_node=tick).log_paths)
