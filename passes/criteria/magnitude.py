"""Magnitude criterion: score = |theta ⊙ m| at initialisation (Synaptic-Flow ``Mag``).

Already pruned weights score 0, as in the reference code, which zeroes pruned weights in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from pai_compiler.ir import Graph, Param
from pai_compiler.pass_infra import AnalysisManager
from pai_compiler.passes.criteria._base import CriterionPass

__all__ = ["MagnitudePass"]


@dataclass(frozen=True)
class MagnitudePass(CriterionPass):
    """Keep the largest-magnitude weights (global by default, per layer with scope=layer)."""

    name: ClassVar[str] = "magnitude"

    def scores(self, graph: Graph, am: AnalysisManager, params: list[Param]) -> dict[str, np.ndarray]:
        return {p.name: np.abs(np.asarray(p.data, dtype=np.float64)) * p.mask_or_ones() for p in params}
