"""Magnitude criterion: score = |theta ⊙ m| at initialisation (Synaptic-Flow ``Mag``).

Already pruned weights score 0, as in the reference code, which zeroes pruned weights in place.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from pai_compiler.ir import Graph, Param
from pai_compiler.pass_infra import AnalysisManager
from pai_compiler.passes.criteria.base import CriterionPass, LazyScores

__all__ = ["MagnitudePass"]


@dataclass(frozen=True)
class MagnitudePass(CriterionPass):
    """Keep the largest-magnitude weights (global by default, per layer with scope=layer)."""

    name: ClassVar[str] = "magnitude"

    def scores(self, graph: Graph, am: AnalysisManager, params: list[Param]) -> Mapping[str, np.ndarray]:
        return LazyScores(params, _magnitude)


def _magnitude(p: Param) -> np.ndarray:
    """|theta|, zero where an earlier pass already pruned (so pruned weights stay pruned)."""
    score = np.abs(np.asarray(p.data))
    if not np.issubdtype(score.dtype, np.floating):
        score = score.astype(np.float64)
    if p.mask is not None:
        score[~p.mask] = 0
    return score
