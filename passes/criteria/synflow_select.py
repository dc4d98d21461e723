"""SynFlow's per-round top-k: the k largest scores, ties to lower indices, NaN lowest, in place.

``topk_mask_torch`` is the rule (a ``kthvalue`` threshold, then the first ``need`` ties by
index). ``topk_mask_into`` computes the same mask into a preallocated bool buffer; on the CPU
it finds the threshold t (the k-th largest) without sorting or copying the whole array:

* a sample of ``SAMPLE_SIZE`` scores (fixed random positions) gives two order statistics lo <= hi that bracket
  t with high probability; two counting passes check G(hi) < k <= GE(lo), where G(x) counts
  scores > x and GE(x) scores >= x, which *proves* lo <= t <= hi;
* t is then the (k - G(hi))-th largest of the few scores in [lo, hi]; when the bracket holds a
  mass of equal scores at an end (from round 2 on, the pruned weights' zeros sit at lo), two more
  counts either prove t = lo or t = hi or narrow the candidates to the open interval (lo, hi);
* the mask is ``scores > t`` plus the first ``k - G(t)`` scores equal to t.

A missed bracket falls back to a full selection of the non-NaN scores, and a NaN or -inf that
could reach the threshold to ``topk_mask_torch`` itself, so the mask is always the rule's; only
the time differs (a few sort-free passes instead of a full selection over tens of millions of
scores every round).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["SAMPLE_SIZE", "SAMPLED_ABOVE", "topk_mask_torch", "topk_mask_into", "kth_largest"]

SAMPLE_SIZE = 1 << 16
SAMPLED_ABOVE = 16 * SAMPLE_SIZE  # smaller arrays: one full selection is as quick as the sample
_TIE_BLOCK = 1 << 20
_TIE_MASS = 16  # more than 1/16 of the scores in the bracket: look for a tie at its ends before gathering them
_BRACKET_SIGMAS = 5.0  # half-width of the sampled bracket in binomial standard deviations


def topk_mask_torch(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Device twin of ``base.topk_mask``: the k largest, ties to lower indices, NaN lowest."""
    import torch  # heavy optional dependency

    n = flat.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    flat = torch.nan_to_num(flat, nan=-math.inf)
    threshold = torch.kthvalue(flat, n - k + 1).values
    above = flat > threshold
    ties = flat == threshold
    need = k - above.sum()
    return above | (ties & (torch.cumsum(ties.to(torch.int64), 0) <= need))


def _count(compare: np.ufunc, scores: np.ndarray, value: float, scratch: np.ndarray) -> int:
    compare(scores, value, out=scratch)
    return int(np.count_nonzero(scratch))


def _sample_bracket(scores: np.ndarray, k: int) -> tuple[float, float] | None:
    """Two sampled order statistics lo <= hi around the k-th largest (None: no finite sample).

    The sample is drawn at fixed random positions, not strided: a layer's scores repeat with its
    kernel's period, and a stride in step with it would bias the sample.
    """
    positions = np.random.default_rng(scores.size).integers(0, scores.size, SAMPLE_SIZE)
    sample = scores[positions]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return None
    m = sample.size
    fraction = 1.0 - k / scores.size  # ascending position of the k-th largest
    half_width = _BRACKET_SIGMAS * math.sqrt(m * fraction * (1.0 - fraction)) + 2.0
    lo_index = min(m - 1, max(0, int(fraction * m - half_width)))
    hi_index = min(m - 1, max(0, int(math.ceil(fraction * m + half_width))))
    part = np.partition(sample, (lo_index, hi_index))
    return float(part[lo_index]), float(part[hi_index])


def _kth_largest_by_partition(scores: np.ndarray, k: int) -> float | None:
    """The k-th largest non-NaN score by a full selection (None: fewer than k are not NaN)."""
    finite = scores[~np.isnan(scores)]
    if finite.size < k:
        return None
    return float(np.partition(finite, finite.size - k)[finite.size - k])


def kth_largest(scores: np.ndarray, k: int, scratch: np.ndarray, spare: np.ndarray) -> float | None:
    """The k-th largest of flat ``scores`` (1 <= k <= size) among its non-NaN entries, or None
    when fewer than k are not NaN (the caller then applies the rule, NaN as -inf).

    ``scratch`` and ``spare`` are bool buffers of the same size, overwritten.
    """
    bracket = None if scores.size <= SAMPLED_ABOVE else _sample_bracket(scores, k)
    if bracket is None:
        return _kth_largest_by_partition(scores, k)
    lo, hi = bracket
    above_hi = _count(np.greater, scores, hi, spare)
    at_least_lo = _count(np.greater_equal, scores, lo, scratch)
    if not above_hi < k <= at_least_lo:  # the sample missed (rare), or too many NaN: NaN counts in neither
        return _kth_largest_by_partition(scores, k)
    if lo == hi:
        return lo
    if at_least_lo - above_hi > scores.size // _TIE_MASS:  # a mass of equal scores at an end (the pruned weights' zeros)
        at_least_hi = _count(np.greater_equal, scores, hi, spare)
        if at_least_hi >= k:
            return hi  # G(hi) < k <= GE(hi)
        if _count(np.greater, scores, lo, scratch) < k:
            return lo  # G(lo) < k <= GE(lo)
        above_hi = at_least_hi  # t lies strictly between lo and hi: scratch = (> lo), spare = (>= hi)
    np.greater(scratch, spare, out=scratch)  # in the bracket and not above it, without another float pass
    between = scores[scratch]
    rank = k - above_hi  # of t among the scores in the bracket, from the top
    return float(np.partition(between, between.size - rank)[between.size - rank])


def topk_mask_into(scores: torch.Tensor, k: int, out: torch.Tensor, scratch: np.ndarray | None = None) -> None:
    """``out[:] = topk_mask_torch(scores, k)`` for flat ``scores``; exact, fast on the CPU.

    ``scratch`` is an optional bool buffer of ``scores``' size (overwritten), reused between rounds.
    """
    n = scores.numel()
    if scores.device.type != "cpu" or k <= 0 or k >= n:
        out.copy_(topk_mask_torch(scores, k))
        return
    values = scores.detach().numpy()
    mask = out.numpy()
    ties = np.empty(n, dtype=bool) if scratch is None else scratch
    threshold = kth_largest(values, k, mask, ties)
    if threshold is None or threshold == -math.inf:  # NaN or -inf could tie at the threshold: the rule itself
        out.copy_(topk_mask_torch(scores, k))
        return
    if _count(np.greater_equal, values, threshold, mask) == k:  # no tie to break (the common case): one pass
        return
    np.greater(values, threshold, out=mask)
    need = k - int(np.count_nonzero(mask))
    np.equal(values, threshold, out=ties)
    _add_first_ties(mask, ties, need)


def _add_first_ties(mask: np.ndarray, ties: np.ndarray, need: int) -> None:
    """Set ``mask`` at the first ``need`` positions where ``ties`` holds, a block at a time (no index array
    of every tie: with constant-initialised layers a tie can span millions of weights)."""
    for start in range(0, ties.size, _TIE_BLOCK):
        if need <= 0:
            return
        block = ties[start : start + _TIE_BLOCK]
        count = int(np.count_nonzero(block))
        if count <= need:
            np.logical_or(mask[start : start + _TIE_BLOCK], block, out=mask[start : start + _TIE_BLOCK])
        else:
            mask[start + np.flatnonzero(block)[:need]] = True
        need -= count
