"""Uniform allocation: every prunable layer gets the same sparsity s, keep = n - floor(s*n)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pai_compiler.errors import UsageError
from pai_compiler.ir import Graph
from pai_compiler.pass_infra import AnalysisManager, PassResult, TransformPass
from pai_compiler.passes.allocation.base import allocation_sparsity, provide_allocation

__all__ = ["UniformPass"]


@dataclass(frozen=True)
class UniformPass(TransformPass):
    """Allocate the same density to every prunable layer."""

    name: ClassVar[str] = "uniform"
    sparsity: float | None = None

    pattern: str | None = None  # "N:M": keep N of every M weights along the input axis (e.g. 2:4)

    def __post_init__(self) -> None:
        allocation_sparsity(self.sparsity, self.pattern, self.name)

    def run(self, graph: Graph, am: AnalysisManager) -> PassResult:
        params = graph.prunable_params()
        if not params:
            raise UsageError("uniform: the model has no prunable (conv/linear) weights")
        density = 1.0 - allocation_sparsity(self.sparsity, self.pattern, self.name)
        allocation = provide_allocation(am, {p.name: density for p in params}, params, self.spec(), self.pattern)
        return PassResult(modified=False, report=allocation)
