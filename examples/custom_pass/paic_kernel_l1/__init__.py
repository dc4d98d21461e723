"""Kernel-L1 criterion: score(w) = ||K(w)||_1 + |w| * 1e-6, K(w) = the (out, in) kernel holding w.

Weights in kernels with a large L1 norm are kept first, so the mask tends to keep whole
kernels (fewer, denser kernels); the tiny |w| term orders weights inside a kernel.
Use it like any built-in criterion: ``erk{sparsity=0.9},kernel-l1{scope=layer}``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from pai_compiler.ir import Graph, Param
from pai_compiler.pass_infra import AnalysisManager
from pai_compiler.passes.criteria.base import CriterionPass

__all__ = ["KernelL1Pass"]


@dataclass(frozen=True)
class KernelL1Pass(CriterionPass):
    """Keep the weights of the kernels with the largest L1 norm."""

    name: ClassVar[str] = "kernel-l1"
    tie_weight: float = 1e-6

    def scores(self, graph: Graph, am: AnalysisManager, params: list[Param]) -> dict[str, np.ndarray]:
        out = {}
        for p in params:
            w = np.abs(p.to_oi(np.asarray(p.data, dtype=np.float64)))
            kernel = w.reshape(w.shape[0], w.shape[1] if w.ndim > 1 else 1, -1).sum(axis=-1)
            score = kernel.reshape(kernel.shape + (1,) * (w.ndim - kernel.ndim)) + self.tie_weight * w
            out[p.name] = p.from_oi(np.broadcast_to(score, w.shape))
        return out
