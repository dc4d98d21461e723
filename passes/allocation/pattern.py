"""N:M structured sparsity: in every group of M consecutive weights along a layer's input axis,
at most N are kept (2:4 is what sparse tensor cores run).

A weight W of shape (.., C_in, ..) with ``in_axis`` a is viewed as W' = moveaxis(W, a, -1) of
shape (G, M) groups; the mask keeps the N highest scores of each row (ties to the lower index),
so a patterned layer keeps exactly numel * N / M weights. Layers whose input axis is not a
multiple of M (a first conv on 3 colour channels, say) cannot hold the pattern: they keep the
allocation's own density, unpatterned, and the allocation warns naming them.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pai_compiler.errors import UsageError
from pai_compiler.ir import Param

__all__ = ["NMPattern", "parse_pattern", "holds_pattern", "group_ranks", "nm_mask", "is_nm_mask", "pattern_report"]


@dataclass(frozen=True)
class NMPattern:
    """Keep ``n`` of every ``m`` consecutive weights along the input axis."""

    n: int
    m: int

    @property
    def density(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(text: str, owner: str) -> NMPattern:
    """``"2:4"`` -> NMPattern(2, 4); a clear usage error otherwise."""
    found = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if found is None:
        raise UsageError(f"{owner}: pattern must be N:M (e.g. pattern=2:4), got {text!r}")
    n, m = int(found.group(1)), int(found.group(2))
    if not 0 < n < m:
        raise UsageError(f"{owner}: pattern N:M needs 0 < N < M, got {text!r}")
    return NMPattern(n, m)


def holds_pattern(param: Param, pattern: NMPattern) -> bool:
    """Whether the layer's input axis splits into groups of M."""
    return param.in_axis is not None and param.shape[param.in_axis] % pattern.m == 0


def _groups(array: np.ndarray, param: Param, m: int) -> np.ndarray:
    assert param.in_axis is not None
    return np.moveaxis(array.reshape(param.shape), param.in_axis, -1).reshape(-1, m)


def group_ranks(groups: Any, out: Any) -> Any:
    """Rank of every entry within its group, into ``out`` (zeroed here; uint8 is enough for M < 256).

    ``groups`` is (M, ...): axis 0 runs along a group, every other position is its own group (keep
    each row ``groups[k]`` contiguous: numpy is many times slower on short strided rows).
    rank_j = #{k : s_k > s_j} + #{k < j : s_k = s_j}: the position a stable descending sort gives,
    so ``out < N`` keeps the N highest, ties to the lower index, exactly N per group (no NaN).
    One comparison per pair k < j (M(M-1)/2 of them), each adding to the loser's rank. Operators
    and indexing only: numpy arrays and torch tensors alike (the host and device paths of DPaI's
    selection run this one rule).
    """
    out[...] = 0
    m = groups.shape[0]
    for k in range(m):
        for j in range(k + 1, m):
            later_wins = groups[j] > groups[k]  # strictly: an equal score earlier in the group wins
            out[k] += later_wins
            out[j] += ~later_wins
    return out


def nm_mask(scores: np.ndarray, param: Param, pattern: NMPattern) -> np.ndarray:
    """Bool mask (the weight's shape) keeping the N highest scores of every group of M."""
    groups = _groups(np.asarray(scores, dtype=np.float64), param, pattern.m)
    groups = np.ascontiguousarray(np.where(np.isnan(groups), -np.inf, groups).T)  # (M, G)
    keep = (group_ranks(groups, np.empty(groups.shape, dtype=np.uint8)) < pattern.n).T
    moved = list(param.shape)
    assert param.in_axis is not None
    moved.append(moved.pop(param.in_axis))
    return np.moveaxis(keep.reshape(moved), -1, param.in_axis)


def is_nm_mask(mask: np.ndarray, param: Param, pattern: NMPattern) -> bool:
    """Every group of M along the input axis keeps at most N weights."""
    return bool((_groups(np.asarray(mask), param, pattern.m).sum(axis=1) <= pattern.n).all())


def pattern_report(patterns: Mapping[str, NMPattern]) -> dict[str, str]:
    return {name: str(p) for name, p in patterns.items()}
