"""Sparsity analysis: per prunable layer params, kept weights and density = kept / params."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pai_compiler.ir import Graph, format_shape
from pai_compiler.pass_infra import AnalysisManager, AnalysisPass

__all__ = ["SparsityPass", "LayerSparsity", "SparsityResult"]


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    op: str
    shape: str
    params: int
    kept: int

    @property
    def density(self) -> float:
        return self.kept / self.params if self.params else 1.0


@dataclass(frozen=True)
class SparsityResult:
    layers: tuple[LayerSparsity, ...]

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def kept(self) -> int:
        return sum(layer.kept for layer in self.layers)

    @property
    def density(self) -> float:
        return self.kept / self.params if self.params else 1.0


@dataclass(frozen=True)
class SparsityPass(AnalysisPass[SparsityResult]):
    """One row per distinct prunable weight, in graph order."""

    name: ClassVar[str] = "sparsity"

    def run(self, graph: Graph, am: AnalysisManager) -> SparsityResult:
        rows = []
        for p in graph.prunable_params():
            op = graph.param_users(p)[0].kind.value
            rows.append(LayerSparsity(p.name, op, format_shape(p.shape), p.numel, p.kept()))
        return SparsityResult(tuple(rows))
