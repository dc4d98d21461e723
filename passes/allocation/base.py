"""Shared machinery of allocation passes: per-layer keep count = numel - floor(s_l * numel)."""
from __future__ import annotations

import math
from collections.abc import Mapping

from pai_compiler.errors import UsageError
from pai_compiler.ir import Graph, Param

__all__ = ["check_sparsity", "keep_count", "record_allocation"]


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


def record_allocation(graph: Graph, densities: Mapping[str, float], params: list[Param], source: str) -> None:
    keep = {p.name: keep_count(p.numel, 1.0 - densities[p.name]) for p in params}
    empty = [name for name, k in keep.items() if k == 0]
    if empty:
        graph.meta["warnings"].append(
            f"{source}: {len(empty)} layer(s) keep no weight at this sparsity and are cut off: {', '.join(empty)}"
        )
    graph.set_allocation(keep, source)
