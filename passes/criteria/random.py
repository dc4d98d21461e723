"""Random criterion: i.i.d. uniform scores from a seeded generator, top-k with exact counts.

Per layer (the default, ``scope=layer``) every layer keeps exactly its allocated count, so
``erk{sparsity=s},random`` is random-ERK with exact counts. Scores for layer i come from
``numpy.random.default_rng([seed, i])``: same seed, same mask, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from pai_compiler.ir import Graph, Param
from pai_compiler.pass_infra import AnalysisManager
from pai_compiler.passes.criteria.base import CriterionPass, Scope

__all__ = ["RandomPass"]


@dataclass(frozen=True)
class RandomPass(CriterionPass):
    """Random masks; ``seed`` defaults to the run's ``--seed``."""

    name: ClassVar[str] = "random"
    scope: Scope = "layer"
    seed: int | None = None

    def scores(self, graph: Graph, am: AnalysisManager, params: list[Param]) -> dict[str, np.ndarray]:
        seed = am.context.seed if self.seed is None else self.seed
        return {p.name: np.random.default_rng([seed, i]).random(p.shape) for i, p in enumerate(params)}
