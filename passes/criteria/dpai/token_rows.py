"""Identical rows of a linear layer's input counted once: y = (U W^T)[r], dlogP/dW = sum_g (sum_{r in g} gy_r) (x) U_g.

A path count feeds all-ones data: every token of a transformer (ViT patches, a text model's
positions) carries the same counts unless a path-carrying input tells them apart, so a
[tokens, in] activation typically holds two distinct rows (the class token and the patches).
A linear layer on it then multiplies U (the G distinct rows) instead of every row, scatters the
products back through the row -> group map, and its weight gradient needs only the per-group
sums of the output gradient; dlogP/dx dedups the output-gradient rows the same way. The counts
are those of the full products up to float rounding (the row sums run in another order). Rows
are compared bytewise (exact); with more than half of the rows distinct the plain product runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RowGroups", "row_groups", "rows_times", "group_gradient_into"]


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
    """The row groups of a 2-d array, or None when at most half of its rows repeat (or it has one row)."""
    count = rows.shape[0]
    if count < 2:
        return None
    rows = np.ascontiguousarray(rows)
    group_of: dict[bytes, int] = {}
    inverse = np.empty(count, dtype=np.int64)
    first: list[int] = []
    for i in range(count):
        g = group_of.setdefault(rows[i].tobytes(), len(first))
        if g == len(first):
            first.append(i)
            if 2 * len(first) > count:
                return None
        inverse[i] = g
    return RowGroups(rows[first], inverse)


def rows_times(rows: np.ndarray, matrix_t: np.ndarray) -> np.ndarray:
    """rows @ matrix_t, each distinct row multiplied once."""
    groups = row_groups(rows)
    if groups is None:
        return rows @ matrix_t
    return (groups.unique @ matrix_t)[groups.inverse]


def group_gradient_into(out: np.ndarray, groups: RowGroups, grad_rows: np.ndarray) -> np.ndarray:
    """out[o, i] = sum_r grad_rows[r, o] x[r, i] as one outer product per group (``out`` is written)."""
    per_group = groups.sums(grad_rows)
    np.multiply(per_group[0][:, None], groups.unique[0][None, :], out=out)
    for g in range(1, per_group.shape[0]):
        out += np.multiply.outer(per_group[g], groups.unique[g])
    return out
