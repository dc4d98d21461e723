"""Criterion machinery: scores -> masks by top-k, globally or per layer.

A criterion scores every prunable weight (higher = keep). ``scope=global`` keeps the K
highest scores over all layers, K = N - floor(s*N) (or the allocation's total when an
allocation pass ran and no sparsity is given); ``scope=layer`` keeps each layer's own count
from the allocation pass (ERK, uniform) or, with ``sparsity`` given, n_l - floor(s*n_l).
Ties at the boundary are broken towards the lower flat index, so masks are deterministic.
A layer the allocation gave an N:M pattern keeps the N highest scores of every M along its
input axis whatever the scope (``allocation/pattern.py``); a global budget is shared by the rest.
"""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from pai_compiler.errors import UsageError
from pai_compiler.ir import Graph, Param
from pai_compiler.pass_infra import AnalysisManager, PassResult, TransformPass
from pai_compiler.passes.allocation.base import Allocation, check_sparsity, keep_count
from pai_compiler.passes.allocation.pattern import NMPattern, nm_mask

__all__ = ["CriterionPass", "LazyScores", "topk_mask", "resolve_keep", "apply_scores", "allocation_patterns", "require_layer_counts",
           "warn_empty_layers"]

Scope = Literal["global", "layer"]


def topk_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of the ``k`` largest entries of flat ``scores``; ties go to lower indices."""
    flat = np.asarray(scores).reshape(-1)
    if not np.issubdtype(flat.dtype, np.floating):
        flat = flat.astype(np.float64)
    n = flat.size
    mask = np.zeros(n, dtype=bool)
    if k <= 0:
        return mask
    if k >= n:
        mask[:] = True
        return mask
    if np.isnan(flat).any():
        flat = np.where(np.isnan(flat), -np.inf, flat)
    threshold = np.partition(flat, n - k)[n - k]
    above = flat > threshold
    mask |= above
    need = k - int(above.sum())
    if need > 0:
        ties = np.flatnonzero(flat == threshold)[:need]
        mask[ties] = True
    return mask


def resolve_keep(am: AnalysisManager, params: list[Param], sparsity: float | None, scope: Scope, owner: str) -> dict[str, int] | int:
    """Per-layer keep counts (scope=layer) or one global count (scope=global); without a
    sparsity they come from the allocation an earlier pass provided to ``am``."""
    provided = am.provided(Allocation)
    allocation = None if provided is None else provided.keep
    if scope == "layer":
        if sparsity is not None:
            s = check_sparsity(sparsity, owner)
            return {p.name: keep_count(p.numel, s) for p in params}
        if allocation is None:
            raise UsageError(f"{owner}: scope=layer needs an allocation pass first (e.g. 'erk{{sparsity=0.9}},{owner}') or a sparsity option")
        missing = [p.name for p in params if p.name not in allocation]
        if missing:
            raise UsageError(f"{owner}: no allocation for layer(s) {', '.join(missing[:3])}")
        return {p.name: int(allocation[p.name]) for p in params}
    if sparsity is not None:
        s = check_sparsity(sparsity, owner)
        return keep_count(sum(p.numel for p in params), s)
    if allocation is None:
        raise UsageError(f"{owner}: give a sparsity (e.g. '{owner}{{sparsity=0.9}}') or run an allocation pass first")
    return int(sum(allocation.get(p.name, p.numel) for p in params))


def require_layer_counts(am: AnalysisManager, owner: str, *, own_sparsity: bool) -> None:
    """Precondition of a criterion with its own per-layer selection (dpai, npb): per-layer keep
    counts from an earlier allocation (or its own ``sparsity``); with an N:M pattern the
    allocation's counts rule (both keep N of every M in patterned layers), so no own sparsity."""
    provided = am.provided(Allocation)
    if provided is not None and provided.patterns and own_sparsity:
        raise UsageError(f"{owner}: its own sparsity would replace the N:M counts of '{provided.source}'; drop {owner}'s sparsity "
                         f"(the pattern sets it) or the pattern")
    if not own_sparsity and provided is None:
        raise UsageError(f"{owner}: needs per-layer keep counts: run an allocation first ('erk{{sparsity=0.99}},{owner}') "
                         f"or give {owner}{{sparsity=...}} (ERK)")


def allocation_patterns(am: AnalysisManager) -> Mapping[str, NMPattern]:
    """The N:M pattern of each patterned layer in the provided allocation (empty if none)."""
    provided = am.provided(Allocation)
    return {} if provided is None else provided.patterns


def apply_scores(graph: Graph, params: list[Param], scores: Mapping[str, np.ndarray], keep: dict[str, int] | int,
                 patterns: Mapping[str, NMPattern] | None = None) -> None:
    """Set masks from scores: per layer (dict) or global (int); patterned layers keep N of every M.

    ``scores`` may be a lazy mapping (see ``LazyScores``): per layer, each layer's scores are
    then computed, used and dropped one at a time, so memory stays near one layer's size.
    """
    patterns = patterns or {}
    for p in params:
        if p.name in patterns:
            graph.set_mask(p, nm_mask(scores[p.name], p, patterns[p.name]))
    rest = [p for p in params if p.name not in patterns]
    if isinstance(keep, dict):
        for p in rest:
            graph.set_mask(p, topk_mask(scores[p.name], keep[p.name]).reshape(p.shape))
        return
    if not rest:
        return
    budget = keep - sum(p.kept() for p in params if p.name in patterns)
    flat = np.concatenate([np.asarray(scores[p.name]).reshape(-1) for p in rest])
    mask = topk_mask(flat, budget)
    offset = 0
    for p in rest:
        graph.set_mask(p, mask[offset : offset + p.numel].reshape(p.shape))
        offset += p.numel


def warn_empty_layers(am: AnalysisManager, params: list[Param], owner: str) -> None:
    """Warn (naming them) about layers left with no weight: they cut every path through them."""
    empty = [p.name for p in params if p.mask is not None and not p.mask.any()]
    if empty:
        am.warn(f"{owner}: {len(empty)} layer(s) keep no weight and cut the network: {', '.join(empty)}")


class LazyScores(Mapping[str, np.ndarray]):
    """Scores computed on access (never cached): ``fn(param) -> ndarray``."""

    def __init__(self, params: list[Param], fn: Callable[[Param], np.ndarray]) -> None:
        self._params = {p.name: p for p in params}
        self._fn = fn

    def __getitem__(self, name: str) -> np.ndarray:
        return self._fn(self._params[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)


@dataclass(frozen=True)
class CriterionPass(TransformPass):
    """Base of scoring criteria. Subclasses implement ``scores``."""

    name: ClassVar[str] = ""
    sparsity: float | None = None
    scope: Scope = "global"

    def __post_init__(self) -> None:
        if self.sparsity is not None:
            check_sparsity(self.sparsity, self.name)
        if self.scope not in ("global", "layer"):
            raise UsageError(f"{self.name}: scope must be 'global' or 'layer', got {self.scope!r}")

    @abstractmethod
    def scores(self, graph: Graph, am: AnalysisManager, params: list[Param]) -> Mapping[str, np.ndarray]:
        """Score per prunable weight (same shape as the weight); higher means keep."""

    def run(self, graph: Graph, am: AnalysisManager) -> PassResult:
        params = graph.prunable_params()
        if not params:
            raise UsageError(f"{self.name}: the model has no prunable (conv/linear) weights")
        keep = resolve_keep(am, params, self.sparsity, self.scope, self.name)
        apply_scores(graph, params, self.scores(graph, am, params), keep, allocation_patterns(am))
        warn_empty_layers(am, params, self.spec())
        return PassResult(modified=True, preserved=frozenset())
