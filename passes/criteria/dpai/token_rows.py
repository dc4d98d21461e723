"""Identical rows of a linear layer's input counted once: y = (U W^T)[r], dlogP/dW = sum_g (sum_{r in g} gy_r) (x) U_g.

A path count feeds all-ones data: every token of a transformer (ViT patches, a text model's
positions) carries the same counts unless a path-carrying input tells them apart, so a
[tokens, in] activation typically holds two distinct rows (the class token and the patches).
A linear layer on it then multiplies U (the G distinct rows) instead of every row, scatters the
products back through the row -> group map, and its weight gradient needs only the per-group
sums of the output gradient; dlogP/dx dedups the output-gradient rows the same way. The counts
are those of the full products up to float rounding (the row sums run in another order). Rows
are compared bytewise (exact); with more than ``MAX_GROUPS`` distinct rows (or more than half)
the plain product runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RowGroups", "row_groups", "rows_times", "group_gradient_into", "MAX_GROUPS"]

#: more distinct rows than this and the plain product runs (each group costs a pass over the rows)
MAX_GROUPS = 8


@dataclass
class RowGroups:
    """The distinct rows ``unique`` [G, in] of a [rows, in] array and each row's group ``inverse``."""

    unique: np.ndarray
    inverse: np.ndarray

    def sums(self, per_row: np.ndarray) -> np.ndarray:
        """[G, n]: the sum of ``per_row`` [rows, n] over each group's rows."""
        indicator = np.zeros((self.unique.shape[0], self.inverse.shape[0]), dtype=per_row.dtype)
        indicator[self.inverse, np.arange(self.inverse.shape[0])] = 1.0
        return indicator @ per_row


def row_groups(rows: np.ndarray) -> RowGroups | None:
    """The row groups of a 2-d float32 array, or None when it has one row or more than
    ``MAX_GROUPS`` (or half its rows) distinct rows. One vectorised bytewise comparison per group."""
    count = rows.shape[0]
    limit = min(MAX_GROUPS, count // 2)
    if count < 2 or limit < 1:
        return None
    bits = np.ascontiguousarray(rows).view(np.uint32)  # bytewise: -0.0 and NaN rows group exactly
    inverse = np.full(count, -1, dtype=np.int64)
    first: list[int] = []
    start = 0
    while start < count:
        if len(first) == limit:
            return None
        same = (bits[start:] == bits[start]).all(1)
        inverse[start:][same & (inverse[start:] < 0)] = len(first)
        first.append(start)
        rest = np.flatnonzero(inverse[start:] < 0)
        start = start + int(rest[0]) if rest.size else count
    return RowGroups(np.ascontiguousarray(rows)[first], inverse)


def rows_times(rows: np.ndarray, matrix_t: np.ndarray) -> np.ndarray:
    """rows @ matrix_t, each distinct row multiplied once."""
    groups = row_groups(rows)
    if groups is None:
        return rows @ matrix_t
    return (groups.unique @ matrix_t)[groups.inverse]


def group_gradient_into(out: np.ndarray, groups: RowGroups, grad_rows: np.ndarray) -> np.ndarray:
    """out[o, i] = sum_r grad_rows[r, o] x[r, i] as one outer product per group (``out`` is written;
    torch's rank-1 update is ~2x numpy's outer product plus add)."""
    import torch  # heavy: loaded with the tape already, kept out of this module's import

    per_group = torch.from_numpy(groups.sums(grad_rows))
    unique, target = torch.from_numpy(groups.unique), torch.from_numpy(out)
    torch.outer(per_group[0], unique[0], out=target)
    for g in range(1, per_group.shape[0]):
        target.addr_(per_group[g], unique[g])
    return out
