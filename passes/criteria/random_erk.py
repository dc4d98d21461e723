"""Random-ERK criterion: layer l keeps exactly n_l - floor((1 - rho_l^ERK) n_l) weights chosen at random.

One pass for ``erk{sparsity=s},random{scope=layer}``: the kernel-aware ERK densities of
:mod:`~pai_compiler.passes.allocation.erk` become per-layer keep counts (provided as the
run's ``Allocation``), then each layer keeps the top-k of uniform scores drawn from
``numpy.random.default_rng([seed, i])`` for the i-th prunable layer, the same RNG scheme as
``random``, so both pipelines give bit-identical masks. Unlike NPB's Bernoulli ``Random_ERK``
the counts are exact (as DPaI's ``--ablation random``). Without ``sparsity`` it uses the
allocation of an earlier pass (``erk``/``uniform``), which is what ``--method random-erk`` builds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from pai_compiler.errors import UsageError
from pai_compiler.ir import Graph
from pai_compiler.pass_infra import AnalysisManager, PassResult, TransformPass
from pai_compiler.passes.allocation.base import Allocation, check_sparsity, provide_allocation
from pai_compiler.passes.allocation.erk import erk_densities
from pai_compiler.passes.criteria.base import allocation_patterns, apply_scores, resolve_keep

__all__ = ["RandomErkPass"]


@dataclass(frozen=True)
class RandomErkPass(TransformPass):
    """Random masks with exact per-layer ERK counts; ``seed`` defaults to the run's ``--seed``."""

    name: ClassVar[str] = "random-erk"
    sparsity: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.sparsity is not None:
            check_sparsity(self.sparsity, self.name)

    def run(self, graph: Graph, am: AnalysisManager) -> PassResult:
        params = graph.prunable_params()
        if not params:
            raise UsageError(f"{self.name}: the model has no prunable (conv/linear) weights")
        if self.sparsity is not None:
            provide_allocation(am, erk_densities(params, 1.0 - float(self.sparsity)), params, self.spec())
        elif am.provided(Allocation) is None:
            raise UsageError(f"{self.name}: give a sparsity, e.g. '{self.name}{{sparsity=0.9}}'")
        keep = resolve_keep(am, params, None, "layer", self.name)
        seed = am.context.seed if self.seed is None else self.seed
        scores = {p.name: np.random.default_rng([seed, i]).random(p.shape) for i, p in enumerate(params)}
        apply_scores(graph, params, scores, keep, allocation_patterns(am))
        return PassResult(modified=True, preserved=frozenset())
