"""Shared machinery of allocation passes: per-layer keep count = numel - floor(s_l * numel).

An allocation pass hands its ``Allocation`` to the passes after it through the AnalysisManager
(``am.provided(Allocation)``) and keeps it as its report; it is never graph state. With an N:M
``pattern`` (``erk{sparsity=0.5,pattern=2:4}``), every layer that can hold it keeps exactly
numel * N / M weights, N of every M along its input axis (``allocation/pattern.py``); criteria
then pick the N best of each group."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from pai_compiler.errors import UsageError
from pai_compiler.ir import Param
from pai_compiler.pass_infra import AnalysisManager
from pai_compiler.passes.allocation.pattern import NMPattern, holds_pattern, parse_pattern

__all__ = ["Allocation", "check_sparsity", "keep_count", "provide_allocation", "allocation_sparsity"]


@dataclass(frozen=True)
class Allocation:
    """Per-layer keep counts (param name -> kept weights), the pass spec that decided them, and
    the N:M pattern of each patterned layer (empty without ``pattern``)."""

    keep: Mapping[str, int]
    source: str
    patterns: Mapping[str, NMPattern] = field(default_factory=dict)

    def __post_init__(self) -> None:  # read-only: the passes after the allocation share it
        object.__setattr__(self, "keep", MappingProxyType(dict(self.keep)))
        object.__setattr__(self, "patterns", MappingProxyType(dict(self.patterns)))


def check_sparsity(sparsity: float | None, owner: str) -> float:
    if sparsity is None:
        raise UsageError(f"{owner}: sparsity is required, e.g. {owner}{{sparsity=0.95}}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or math.isnan(sparsity):
        raise UsageError(f"{owner}: sparsity must be a number in (0, 1), got {sparsity!r}")
    if not 0.0 < float(sparsity) < 1.0:
        raise UsageError(f"{owner}: sparsity must be in (0, 1) (exclusive), got {sparsity}")
    return float(sparsity)


def keep_count(numel: int, layer_sparsity: float) -> int:
    """Weights kept in a layer: numel - floor(s_l * numel), as the reference code does."""
    return numel - int(math.floor(layer_sparsity * numel))


def allocation_sparsity(sparsity: float | None, pattern: str | None, owner: str) -> float:
    """The allocation's target sparsity: given, or 1 - N/M for a ``pattern`` alone."""
    if sparsity is None and pattern is not None:
        return 1.0 - parse_pattern(pattern, owner).density
    return check_sparsity(sparsity, owner)


def provide_allocation(am: AnalysisManager, densities: Mapping[str, float], params: list[Param], source: str,
                       pattern: str | None = None) -> Allocation:
    """Keep counts from per-layer densities, handed to the passes that follow (``am.provided(Allocation)``).

    With ``pattern`` N:M, layers that can hold it keep numel * N / M instead (the others keep
    their density, with a warning naming them). Warns about layers left with no weight."""
    keep = {p.name: keep_count(p.numel, 1.0 - densities[p.name]) for p in params}
    patterns: dict[str, NMPattern] = {}
    if pattern is not None:
        nm = parse_pattern(pattern, source)
        patterns = {p.name: nm for p in params if holds_pattern(p, nm)}
        keep.update({p.name: p.numel * nm.n // nm.m for p in params if p.name in patterns})
        free = [p.name for p in params if p.name not in patterns]
        if free:
            am.warn(f"{source}: {len(free)} layer(s) have an input axis that is not a multiple of {nm.m} and keep "
                    f"their own density, unpatterned: {', '.join(free)}")
    empty = [name for name, k in keep.items() if k == 0]
    if empty:
        am.warn(f"{source}: {len(empty)} layer(s) keep no weight at this sparsity and are cut off: {', '.join(empty)}")
    allocation = Allocation(keep, source, patterns)
    am.provide(allocation)
    return allocation
