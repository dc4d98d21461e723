"""Shared machinery of allocation passes: per-layer keep count = numel - floor(s_l * numel).

An allocation pass hands its ``Allocation`` to the passes after it through the AnalysisManager
(``am.provided(Allocation)``) and keeps it as its report; it is never graph state."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from pai_compiler.errors import UsageError
from pai_compiler.ir import Param
from pai_compiler.pass_infra import AnalysisManager

__all__ = ["Allocation", "check_sparsity", "keep_count", "provide_allocation"]


@dataclass(frozen=True)
class Allocation:
    """Per-layer keep counts (param name -> kept weights) and the pass spec that decided them."""

    keep: Mapping[str, int]
    source: str

    def __post_init__(self) -> None:  # read-only: the passes after the allocation share it
        object.__setattr__(self, "keep", MappingProxyType(dict(self.keep)))


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


def provide_allocation(am: AnalysisManager, densities: Mapping[str, float], params: list[Param], source: str) -> Allocation:
    """Keep counts from per-layer densities, handed to the passes that follow (``am.provided(Allocation)``).

    Warns about layers left with no weight."""
    keep = {p.name: keep_count(p.numel, 1.0 - densities[p.name]) for p in params}
    empty = [name for name, k in keep.items() if k == 0]
    if empty:
        am.warn(f"{source}: {len(empty)} layer(s) keep no weight at this sparsity and are cut off: {', '.join(empty)}")
    allocation = Allocation(keep, source)
    am.provide(allocation)
    return allocation
