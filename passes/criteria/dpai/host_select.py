"""One bucket's top-k on the CPU over its pools' real entries only: per row, the k_r-th largest |S| by introselect, then
the entries above it and, of those equal to it, the first ones in the row (index ties).

:class:`RaggedPools` holds a bucket's padded pool [rows, width] as its real entries, row after
row (``flat``, ascending flat index within a row), with each row's start and length. The padded
selection (``select._Bucket.host_picks``) partitions every row to the bucket's width plus kmax + 1
fillers, where a row's capacity is often a fraction of the widest row's (ResNet-20: 18.8k real
entries in a 22 x 2045 padded pool). Here each row is partitioned in place over its own length,
and the comparisons, counts and the tie rule run once over the ragged vector, with per-row sums
by ``reduceat`` and per-row running counts from one ``cumsum``. The k_r-th largest is the same
float32 value as the padded one's, and the kept entries, their order and the tie count are the same.
"""
from __future__ import annotations

import numpy as np

__all__ = ["RaggedPools"]


class RaggedPools:
    """A bucket's pools as one ragged vector (see the module docstring). Needs every row to hold
    more entries than it keeps (:meth:`fits`); the padded selection handles any other row."""

    def __init__(self, pool: np.ndarray, pad: np.ndarray, keeps: np.ndarray) -> None:
        lengths = (~pad).sum(1)
        self.flat = pool[~pad]  # row-major: each row's real entries, then the next row's
        self.lengths, self.keeps = [int(n) for n in lengths], [int(k) for k in keeps]
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.intp)
        self.ends = self.starts + lengths.astype(np.intp) - 1
        self.repeats = lengths.astype(np.intp)
        self.keep = np.asarray(keeps, dtype=np.intp)
        self._scratch = np.empty(self.flat.size, dtype=np.float32)
        self._kth = np.empty(len(lengths), dtype=np.float32)

    @staticmethod
    def fits(pad: np.ndarray, keeps: np.ndarray) -> bool:
        """Every row holds more real entries than it keeps (and so at least one)."""
        return bool(((~pad).sum(1) > np.asarray(keeps)).all())

    def picks(self, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(kept flat indices row after row, k-th largest per row, rows whose (k+1)-th largest equals the k-th)."""
        scratch, kth = self._scratch, self._kth
        np.copyto(scratch, vals)
        for r, (start, length, keep) in enumerate(zip(self.starts.tolist(), self.lengths, self.keeps)):
            row = scratch[start : start + length]
            row.partition(length - keep)  # in place: the k-th largest lands at length - keep
            kth[r] = row[length - keep]
        at_row = np.repeat(kth, self.repeats)  # a third of a gather's cost
        above, at = vals > at_row, vals == at_row
        need = self.keep - np.add.reduceat(above, self.starts, dtype=np.intp)
        running = np.cumsum(at, dtype=np.intp)
        before = running[self.starts] - at[self.starts]  # ties counted before each row
        # the row's running tie count (running - before) at most need: running <= need + before
        selected = above | (at & (running <= np.repeat(need + before, self.repeats)))
        tied = int(np.count_nonzero(running[self.ends] - before > need))
        return self.flat[selected], kth.copy(), tied
