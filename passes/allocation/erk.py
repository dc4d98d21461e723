"""ERK allocation: kernel-aware Erdős–Rényi layer densities (Evci et al.; DPaI/NPB reference).

For a layer with weight shape (d_1..d_k) and n = prod(d_i): raw = (sum d_i) / n (power 1).
With a dense set D (initially empty) and target density rho:
    eps = [sum_{l not in D} rho*n_l - sum_{l in D} (1 - rho)*n_l] / sum_{l not in D} raw_l*n_l
If max_{l not in D} eps*raw_l > 1, every layer whose raw equals that maximum joins D and we
repeat; else density_l = eps*raw_l (1 for l in D). Keep count = n - floor((1 - density)*n).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pai_compiler.errors import UsageError
from pai_compiler.ir import Graph, Param
from pai_compiler.pass_infra import AnalysisManager, PassResult, TransformPass
from pai_compiler.passes.allocation.base import allocation_sparsity, provide_allocation

__all__ = ["ErkPass", "erk_densities"]


def erk_densities(params: list[Param], density: float, power: float = 1.0) -> dict[str, float]:
    """Per-layer densities (param name -> density) for a global ``density``."""
    raw = {p.name: (sum(p.shape) / p.numel) ** power for p in params}
    numel = {p.name: p.numel for p in params}
    dense: set[str] = set()
    while True:
        free = [p.name for p in params if p.name not in dense]
        if not free:
            raise UsageError("erk: every layer became dense; the density is too high for ERK")
        budget = sum(density * numel[n] for n in free) - sum((1 - density) * numel[n] for n in dense)
        eps = budget / sum(raw[n] * numel[n] for n in free)
        top = max(raw[n] for n in free)
        if eps * top > 1:
            dense.update(n for n in free if raw[n] == top)
            continue
        return {n: (1.0 if n in dense else eps * raw[n]) for n in numel}


@dataclass(frozen=True)
class ErkPass(TransformPass):
    """Allocate per-layer keep counts with ERK densities (every prunable layer, first and last too)."""

    name: ClassVar[str] = "erk"
    sparsity: float | None = None
    power: float = 1.0

    pattern: str | None = None  # "N:M": keep N of every M weights along the input axis (e.g. 2:4)

    def __post_init__(self) -> None:
        allocation_sparsity(self.sparsity, self.pattern, self.name)

    def run(self, graph: Graph, am: AnalysisManager) -> PassResult:
        params = graph.prunable_params()
        if not params:
            raise UsageError("erk: the model has no prunable (conv/linear) weights")
        sparsity = allocation_sparsity(self.sparsity, self.pattern, self.name)
        densities = erk_densities(params, 1.0 - sparsity, self.power)
        allocation = provide_allocation(am, densities, params, self.spec(), self.pattern)
        return PassResult(modified=False, report=allocation)
