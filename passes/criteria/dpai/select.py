"""Per-layer top-k of |score| as the DPaI reference computes it, kept incrementally.

Reference rule: sort |S_l| ascending (``torch.sort``, not stable on CPU) and drop the
z_l = n_l - k_l first entries. Where the k-th and (k+1)-th largest |S| are equal (common:
boundary entries move in lockstep) the sort decides which survive. ``ties="sort"`` detects such
a tie and runs that very sort on the layer; ``ties="index"`` keeps the lower flat indices
(cheap, deterministic, not the reference's choice).

Incremental selection. A *rebuild* keeps a pool P_l = {e : |S_e| >= t0_l - M} around each
layer's exact k-th largest value t0_l. If no score moved by more than D since (D sums the
per-step Adam bounds of :func:`adam_step_bound`), an entry outside P_l has |S| < t0_l - M + D,
so while D <= t_l - t0_l + M, with t_l the k-th largest inside P_l, every outside entry lies
strictly below t_l: the top-k and the tie test (which needs only the (k+1)-th largest) can be
read from the pool. When the bound runs out we first measure the true drift
max|S - S_rebuild| (one pass, the Adam bound is loose) and only then rebuild: the true k-th
largest is >= t0_l - D, so only entries >= t0_l - D - M need scanning. The result equals a
full sort every step, bit for bit. Layers with keep counts within a factor 2 share a padded
pool and one unsorted ``topk`` per step (``_Bucket``). A rebuild scans one layer at a time (no
temporary the size of all scores). ``layout`` is anything whose ``layers`` have index, offset,
numel and keep: a ``Layout``, or a ``BandState`` whose layers are its bands.

Layers with an N:M ``pattern`` (from the allocation) take no part in the pools: their kept
entries are the per-group top-N of every step (``group_select.GroupTopN``, index ties within a
group whatever ``ties`` says), listed after the pooled layers and before the dense ones.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pai_compiler.passes.allocation.pattern import NMPattern
from pai_compiler.passes.criteria.dpai.group_select import GroupTopN
from pai_compiler.passes.criteria.dpai.host_select import RaggedPools
from pai_compiler.passes.criteria.dpai.kernel_state import AbsScores, ScoreSource
from pai_compiler.passes.criteria.dpai.layout import Layout

if TYPE_CHECKING:
    import torch

__all__ = ["IncrementalTopK", "TieRule", "adam_step_bound", "reference_topk", "kth_smallest"]

TieRule = Literal["sort", "index"]
#: all layers share one bucket when its padded pool (rows x ~3 kmax) stays under this many
#: entries: per-op dispatch then costs more than the +inf filling
ONE_BUCKET = 1 << 16


def adam_step_bound(step: int, beta1: float = 0.9, beta2: float = 0.999) -> float:
    """Upper bound of |m_hat| / sqrt(v_hat) after ``step`` Adam steps, for any gradients.

    |m_t| <= (1-b1) sum b1^(t-s)|g_s| <= (1-b1)/sqrt(1-b2) * sqrt(sum_{u<t} (b1^2/b2)^u) * sqrt(v_t)
    (Cauchy-Schwarz), times the bias corrections sqrt(1-b2^t) / (1-b1^t).
    """
    r = beta1 * beta1 / beta2
    geometric = (1.0 - r**step) / (1.0 - r)
    return (1.0 - beta1) / math.sqrt(1.0 - beta2) * math.sqrt(geometric) * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) as a 0-d tensor: numpy's introselect on the CPU (several
    times torch's ``kthvalue`` there, the same value), ``kthvalue`` elsewhere."""
    import torch

    if values.device.type == "cpu":
        return torch.tensor(np.partition(values.numpy(), k - 1)[k - 1])
    return torch.kthvalue(values, k).values


def reference_topk(abs_scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Kept positions of one layer as the reference computes them (sort ascending, drop z)."""
    import torch

    order = torch.sort(abs_scores.reshape(-1)).indices
    return order[abs_scores.numel() - keep :]


class _Bucket:
    """Layers (rows) with similar keep counts: one padded pool and one unsorted ``topk`` per step.

    Row r also gets kmax - k_r trailing +inf fillers, so the kmax+1 largest of every row hold
    its k_r + 1 largest real values.
    """

    def __init__(self, rows: list[int], keeps: list[int], device: str | torch.device) -> None:
        import torch

        self.rows, self.device = rows, device
        self.keep = torch.as_tensor(keeps, dtype=torch.int64, device=device)
        self.kmax = max(keeps)
        cols = torch.arange(self.kmax + 1, device=device).unsqueeze(0)
        self.fill = torch.where(cols < (self.kmax - self.keep).unsqueeze(1), math.inf, -math.inf)
        self.width = 0
        self.ragged: tuple[RaggedPools, Any] | None = None  # the host layout of the pool and its constants
        self._aux: Any = None
        self._source: ScoreSource | None = None
        self.t0: torch.Tensor | None = None
        self.total = sum(keeps)
        self.row_start = torch.as_tensor(np.cumsum([0] + keeps[:-1]) - 1, dtype=torch.int64, device=device).unsqueeze(1)

    def pack(self, hits: list[torch.Tensor], source: ScoreSource) -> None:
        """Padded [rows, width] pool from each row's flat indices (ascending)."""
        import torch

        self.width = max((int(h.numel()) for h in hits), default=0)
        self.pool = torch.zeros(len(self.rows), self.width, dtype=torch.int64, device=self.device)
        self.pad = torch.ones(len(self.rows), self.width, dtype=torch.bool, device=self.device)
        for i, h in enumerate(hits):
            self.pool[i, : h.numel()] = h
            self.pad[i, : h.numel()] = False
        self.size = sum(int(h.numel()) for h in hits)
        self.repooled(source)

    def repooled(self, source: ScoreSource) -> None:
        """After the pool changed: its per-entry constants and the ragged host layout, each made again on first use."""
        self._aux, self._source = None, source
        self.ragged = None

    @property
    def aux(self) -> Any:
        """``source.prepare(pool)`` (made on first use: the host selection reads the ragged layout's own)."""
        if self._aux is None:
            assert self._source is not None, "a pool is packed or refilled before it is read"
            self._aux = self._source.prepare(self.pool)
        return self._aux

    def lowest_first(self, vals: torch.Tensor, kth: torch.Tensor) -> torch.Tensor:
        """Kept flat indices, row after row: the entries above the k-th largest and, of those
        equal to it, the first in the row (pool rows hold ascending flat indices). Every row
        keeps exactly k_r, so this is fixed-shape: no host sync, no ``nonzero``."""
        return self._lowest_first(vals, kth)[0]

    def _lowest_first(self, vals: torch.Tensor, kth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(:meth:`lowest_first`, rows whose (k+1)-th largest equals the k-th: a boundary tie)."""
        import torch

        kth = kth.unsqueeze(1)
        above, at = vals > kth, vals == kth
        need = (self.keep - above.sum(1)).unsqueeze(1)
        counted = torch.cumsum(at, 1)
        sel = above | (at & (counted <= need))
        slot = torch.cumsum(sel, 1).add_(self.row_start).where(sel, self.total)  # row start + rank - 1, or the dump slot
        out = torch.empty(self.total + 1, dtype=self.pool.dtype, device=self.device)
        return out.scatter_(0, slot.view(-1), self.pool.view(-1))[: self.total], (counted[:, -1:] > need).sum()

    def kth_picks(self, source: ScoreSource, host_partition: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kept flat indices as :meth:`lowest_first`, k-th largest per row, tie rows): the
        value of rank kmax from the top of each row and its fillers, by ``kthvalue`` or, with
        ``host_partition`` (CPU tensors), numpy's introselect (6x faster than torch's there)."""
        import torch

        vals = source.at(self.pool, self.aux).masked_fill_(self.pad, -math.inf)
        padded = torch.cat([vals, self.fill], 1)
        col = padded.shape[1] - self.kmax  # 0-based rank from the bottom
        if host_partition:
            kth = torch.from_numpy(np.partition(padded.numpy(), col, axis=1)[:, col])
        else:
            kth = torch.kthvalue(padded, col + 1, dim=1).values
        picks, tied = self._lowest_first(vals, kth)
        return picks, kth, tied

    def host_picks(self, source: ScoreSource) -> tuple[np.ndarray, np.ndarray, int]:
        """:meth:`kth_picks` in numpy on CPU tensors: (kept flat indices row after row, k-th largest
        per row, tie rows). The same float32 values, k-th largest and tie rule; ``pool[selected]``
        lists each row's kept entries in ascending flat index, the order the scatter writes. Over
        the real entries only (``host_select.RaggedPools``) where every row holds more than it keeps."""
        if self.ragged is None and RaggedPools.fits(self.pad.numpy(), self.keep.numpy()):
            ragged = RaggedPools(self.pool.numpy(), self.pad.numpy(), self.keep.numpy())
            self.ragged = (ragged, source.prepare_host(ragged.flat))
        if self.ragged is not None:
            ragged, aux = self.ragged
            return ragged.picks(source.at_host(ragged.flat, aux))
        pool = self.pool.numpy()
        vals = source.at_host(pool, self.aux)
        np.copyto(vals, -np.inf, where=self.pad.numpy())
        padded = np.concatenate([vals, self.fill.numpy()], 1)
        col = padded.shape[1] - self.kmax  # 0-based rank from the bottom
        kth = np.partition(padded, col, axis=1)[:, col]
        above, at = vals > kth[:, None], vals == kth[:, None]
        need = self.keep.numpy() - above.sum(1)
        counted = np.cumsum(at, 1)
        selected = above | (at & (counted <= need[:, None]))
        return pool[selected], kth, int((counted[:, -1] > need).sum())

    def top(self, source: ScoreSource) -> tuple[torch.Tensor, ...]:
        """(pool values, top values, top columns, k-th, (k+1)-th largest) per row."""
        import torch

        vals = source.at(self.pool, self.aux).masked_fill_(self.pad, -math.inf)
        top_v, top_i = torch.topk(torch.cat([vals, self.fill], 1), self.kmax + 1, dim=1, sorted=False)
        low = torch.topk(top_v, 2, dim=1, largest=False).values
        return vals, top_v, top_i, low[:, 1], low[:, 0]


class IncrementalTopK:
    """Selects every layer's kept entries from the flat scores; see the module docstring."""

    def __init__(self, layout: Layout, device: str | torch.device, ties: TieRule = "sort", margin: float = 0.25,
                 patterns: Mapping[str, NMPattern] | None = None) -> None:
        import torch

        self.layout, self.device, self.ties, self.margin = layout, device, ties, float(margin)
        self.grouped = GroupTopN(layout, patterns or {}, device)
        self.host_groups = torch.device(device).type == "cpu"  # the patterned layers' picks in numpy (the same picks)
        grouped = {layer.index for layer in self.grouped.layers}
        self.partial = [layer for layer in layout.layers if 0 < layer.keep < layer.numel and layer.index not in grouped]
        dense = [layer for layer in layout.layers if layer.keep == layer.numel]
        dense_idx = [np.arange(layer.offset, layer.offset + layer.numel) for layer in dense]
        self.dense_idx = torch.as_tensor(np.concatenate(dense_idx) if dense_idx else np.zeros(0, np.int64), dtype=torch.int64, device=device)
        # buckets of layers whose keep counts are within a factor 2 (little +inf filling), or one
        self.buckets: list[_Bucket] = []
        by_keep = sorted(range(len(self.partial)), key=lambda r: (self.partial[r].keep, r))
        keeps = [layer.keep for layer in self.partial]
        if keeps and len(keeps) * 3 * max(keeps) <= ONE_BUCKET:
            self.buckets.append(_Bucket(list(range(len(keeps))), keeps, device))
            by_keep = []
        while by_keep:
            first = self.partial[by_keep[0]].keep
            rows = sorted(r for r in by_keep if self.partial[r].keep <= 2 * first)
            by_keep = [r for r in by_keep if r not in rows]
            self.buckets.append(_Bucket(rows, [self.partial[r].keep for r in rows], device))
        #: kept-entry order: the partial layers bucket by bucket, then the patterned, then the dense layers
        self.order = [self.partial[r].index for bucket in self.buckets for r in bucket.rows] + [layer.index for layer in self.grouped.layers]
        self.order += [layer.index for layer in dense]
        self.t0: torch.Tensor | None = None
        self.drift = 0.0  # bound on any |S| change since the last rebuild
        self.rebuilds = self.verifications = self._host_ties = 0
        self._tied = torch.zeros((), dtype=torch.int64, device=device)  # index-rule tie events, counted on the device
        self.verified = True
        self.reference: object = None
        self.pool_size = 0

    @property
    def tie_events(self) -> int:
        """Layer-steps whose k-th and (k+1)-th largest |S| were equal (one host sync)."""
        return self._host_ties + int(self._tied)

    def moved(self, bound: float) -> None:
        """Record that no score moved by more than ``bound`` in the last update."""
        self.drift += bound
        self.verified = False

    # ---- pools -----------------------------------------------------------------------------
    def _rebuild(self, source: ScoreSource) -> None:
        """New pools and t0, one layer at a time (no temporaries the size of all scores)."""
        import torch

        if self.t0 is None:
            kth0 = [kth_smallest(source.layer(r.offset, r.numel), r.numel - r.keep + 1) for r in self.partial]
            lower = torch.stack(kth0) - self.margin
        else:
            lower = self.t0 - (self.drift + self.margin)
        kth_all = torch.empty(len(self.partial), dtype=lower.dtype, device=self.device)
        for bucket in self.buckets:
            hits = []
            for r in bucket.rows:
                layer = self.partial[r]
                hits.append(torch.nonzero(source.layer(layer.offset, layer.numel) >= lower[r]).squeeze(1) + layer.offset)
            bucket.pack(hits, source)
            kth = bucket.top(source)[3]
            limit = kth - self.margin  # trim to the margin around the new t0
            bucket.pack([h[source.at(h, source.prepare(h)) >= limit[i]] for i, h in enumerate(hits)], source)
            bucket.t0 = kth
            kth_all[torch.as_tensor(bucket.rows, device=self.device)] = kth
        self.t0, self.drift, self.verified = kth_all, 0.0, True
        self.reference = source.snapshot()
        self.pool_size = sum(bucket.size for bucket in self.buckets)
        self.rebuilds += 1

    # ---- selection -------------------------------------------------------------------------
    def select(self, scores: torch.Tensor | ScoreSource) -> torch.Tensor:
        """Flat indices of the kept entries (int64, ``self.order`` layout) of the top-k of |S|.

        ``scores``: the flat scores, or a :class:`ScoreSource` (e.g. the kernel-level state).
        """
        import torch

        source = scores if isinstance(scores, ScoreSource) else AbsScores(scores)
        if not self.partial:
            return self._joined([], source)
        if self.t0 is None:
            self._rebuild(source)
        if self.ties == "index" and torch.device(self.device).type == "cpu":
            return self._host_select(source)
        for attempt in range(4):
            tops = [bucket.top(source) for bucket in self.buckets]
            ties = [kth == nxt for _, _, _, kth, nxt in tops]
            slack = torch.stack([(t[3] - bucket.t0).amin() for t, bucket in zip(tops, self.buckets)]).amin() + self.margin  # type: ignore[operator]
            ok, any_tie, room = torch.stack([slack >= self.drift, torch.cat(ties).any(), slack]).tolist()
            if ok:
                break
            if attempt == 3:
                raise FloatingPointError("dpai: scores are not finite; the top-k pool cannot be maintained")
            if not self.verified:  # the Adam bound is loose: measure the true drift once
                self.drift = source.drift(self.reference) * (1 + 1e-6)
                self.verified = True
                self.verifications += 1
                if room >= self.drift:
                    continue
            self._rebuild(source)
        return self._joined([self._picks(source, bucket, top, tie, bool(any_tie)) for bucket, top, tie in zip(self.buckets, tops, ties)], source)

    def _joined(self, picks: list[torch.Tensor], source: ScoreSource) -> torch.Tensor:
        """The pooled layers' ``picks``, then the patterned layers' (in numpy with ``host_groups``), then the dense ones."""
        import torch

        if self.grouped.layers:
            host = self.host_groups
            picks = picks + ([torch.from_numpy(p) for p in self.grouped.host_picks(source)] if host else self.grouped.picks(source))
        if self.dense_idx.numel():
            picks = picks + [self.dense_idx]
        if not picks:
            return self.dense_idx
        return torch.cat(picks) if len(picks) > 1 else picks[0]

    def _host_select(self, source: ScoreSource) -> torch.Tensor:
        """:meth:`select` with index ties on CPU tensors: numpy's introselect for the k-th largest
        (several times ``topk``'s speed on big pools), the same pool checks and rebuilds."""
        import torch

        for attempt in range(4):
            found = [bucket.host_picks(source) for bucket in self.buckets]
            room = min(float((kth - bucket.t0.numpy()).min()) for (_, kth, _), bucket in zip(found, self.buckets)) + self.margin  # type: ignore[union-attr]
            if room >= self.drift:
                break
            if attempt == 3:
                raise FloatingPointError("dpai: scores are not finite; the top-k pool cannot be maintained")
            if not self.verified:  # the Adam bound is loose: measure the true drift once
                self.drift = source.drift(self.reference) * (1 + 1e-6)
                self.verified = True
                self.verifications += 1
                if room >= self.drift:
                    break
            self._rebuild(source)
        self._host_ties += sum(tied for _, _, tied in found)
        return self._joined([torch.from_numpy(chosen) for chosen, _, _ in found], source)

    def _picks(self, source: ScoreSource, bucket: _Bucket, top: tuple[torch.Tensor, ...], tie: torch.Tensor, any_tie: bool) -> torch.Tensor:
        """Kept flat indices of one bucket, row after row."""
        import torch

        vals, top_v, top_i, kth, _ = top
        if self.ties == "index":
            self._tied = self._tied + tie.sum()
            return bucket.lowest_first(vals, kth)
        real = top_i < bucket.width
        chosen = (top_v >= kth.unsqueeze(1)) & real
        tied = int(tie.sum()) if any_tie else 0
        if not tied:
            return bucket.pool.gather(1, torch.where(real, top_i, 0))[chosen]
        self._host_ties += tied
        rows = []
        for i, r in enumerate(bucket.rows):
            layer = self.partial[r]
            if bool(tie[i]):  # the reference's full sort of the layer decides
                rows.append(reference_topk(source.layer(layer.offset, layer.numel), layer.keep) + layer.offset)
            else:
                rows.append(bucket.pool[i][top_i[i][chosen[i]]])
        return torch.cat(rows)
