"""Sync-free per-layer top-k (index ties): fixed-capacity pools, validity checked on the device.

A refill keeps, per layer, the C_r entries with the largest |S| (``topk``, fixed shape) and
their smallest value f_r. If no |S| moved by more than D since (D = ``drift_tensor``, measured on
the device every step), every entry outside the pool is <= f_r + D, so while the pool's k-th
largest kth_r > f_r + D the top-k and the index tie rule (pool rows hold ascending flat
indices) read from the pool equal a full sort. Every quantity has a fixed shape and nothing is
read back: each step only ORs "kth_r <= f_r + D" into ``invalid`` and keeps the smallest room
kth_r - f_r - D. The caller reads both once per window (:meth:`FixedPoolTopK.window_end`),
replays a window that went invalid from its checkpoint with the checked selection
(:class:`IncrementalTopK`, host checks every step) and refills when the room runs low.
On CPU tensors (``host_partition``) the same selection runs in numpy (``_Bucket.host_picks``): the
same float32 values, k-th largest and tie rule, the kept entries read as ``pool[selected]`` (row
after row, ascending flat index: the order the device path scatters them in), and the room,
drift and tie count kept as host numbers, and the refills run in numpy too (``argpartition`` per
layer); numpy's per-call cost is a fraction of torch's there.
Capacities: at the first refill (warm-up, host reads allowed) C_r = #{|S| >= kth_r - margin}
plus a quarter (a window moves scores by about window x lr, 0.125 at 25 steps and lr 0.005:
margin 0.5 lasts a few windows), grown by half after a window that was not exact (boundary
scores bunch up as DPaI runs).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from pai_compiler.passes.allocation.pattern import NMPattern
from pai_compiler.passes.criteria.dpai.kernel_state import ScoreSource
from pai_compiler.passes.criteria.dpai.layout import Layout
from pai_compiler.passes.criteria.dpai.select import IncrementalTopK, kth_smallest

if TYPE_CHECKING:
    import torch

__all__ = ["FixedPoolTopK"]


class FixedPoolTopK(IncrementalTopK):
    """``select`` as :class:`IncrementalTopK` with ``ties="index"``, but sync-free after :meth:`refill`."""

    def __init__(self, layout: Layout, device: str | torch.device, margin: float = 0.5, host_partition: bool | None = None,
                 patterns: Mapping[str, NMPattern] | None = None) -> None:
        """``host_partition``: the k-th largest (and the patterned layers' group ranks) by numpy on
        CPU tensors (default: on the CPU); ``patterns``: the allocation's N:M layers (``group_select``)."""
        import torch

        super().__init__(layout, device, ties="index", margin=margin, patterns=patterns)
        self.host_partition = torch.device(device).type == "cpu" if host_partition is None else host_partition
        self.host_groups = self.host_partition
        self.checked = IncrementalTopK(layout, device, ties="index", margin=margin, patterns=patterns)
        self.capacity: list[list[int]] | None = None
        self.invalid = torch.zeros((), dtype=torch.bool, device=device)
        self.room = torch.full((), math.inf, device=device)
        self.start_room = torch.full((), math.inf, device=device)  # the room at a window's first step
        self._window_start = True
        self.replays = 0
        self._host_room = [False, math.inf, math.inf]  # host path: invalid, room, start room

    def moved(self, bound: float) -> None:
        super().moved(bound)
        self.checked.moved(bound)

    def _size(self, source: ScoreSource) -> None:
        """Capacities from the current scores (warm-up: reads counts back once)."""
        capacity = []
        for bucket in self.buckets:
            rows = []
            for r in bucket.rows:
                layer = self.partial[r]
                values = source.layer(layer.offset, layer.numel)
                kth = kth_smallest(values, layer.numel - layer.keep + 1)
                near = int((values >= kth - self.margin).sum())
                rows.append(min(layer.numel, max(near + near // 4, layer.keep + 1 + 16)))
            capacity.append(rows)
        self._allocate(capacity)

    def grow(self) -> None:
        """Half as much room again in every pool (boundary scores bunch up as DPaI runs)."""
        assert self.capacity is not None
        self._allocate([[min(self.partial[r].numel, cap + cap // 2) for r, cap in zip(bucket.rows, rows)] for bucket, rows in zip(self.buckets, self.capacity)])

    def _allocate(self, capacity: list[list[int]]) -> None:
        import torch

        self.capacity = capacity
        for bucket, rows in zip(self.buckets, capacity):
            width = max(rows)
            bucket.width = width
            bucket.pool = torch.zeros(len(rows), width, dtype=torch.int64, device=self.device)
            cols = torch.arange(width, device=self.device).unsqueeze(0)
            bucket.pad = cols >= torch.as_tensor(rows, device=self.device).unsqueeze(1)
            bucket.size = sum(rows)
        self.pool_size = sum(bucket.size for bucket in self.buckets)

    def refill(self, source: ScoreSource) -> None:
        """Each pool := the top C_r of its layer (fixed shapes, no host sync after the first call)."""
        import torch

        if self.capacity is None:
            self._size(source)
        assert self.capacity is not None
        for bucket, rows in zip(self.buckets, self.capacity):
            if self.host_partition:
                bucket.floor = torch.from_numpy(self._host_refill(bucket.pool.numpy(), bucket.rows, rows, source))
            else:
                floors = []
                for i, (r, cap) in enumerate(zip(bucket.rows, rows)):
                    layer = self.partial[r]
                    values, idx = torch.topk(source.layer(layer.offset, layer.numel), cap, sorted=False)
                    bucket.pool[i, :cap] = torch.sort(idx).values + layer.offset
                    # a pool holding its whole layer has nothing outside it
                    floors.append(values.amin() if cap < layer.numel else values.new_full((), -math.inf))
                bucket.floor = torch.stack(floors)
            bucket.repooled(source)
        self.reference = source.snapshot()
        self.drift = 0.0
        self.rebuilds += 1

    def select(self, scores: torch.Tensor | ScoreSource) -> torch.Tensor:
        """Kept flat indices (``self.order`` layout); device-only work once refilled."""
        import torch

        assert isinstance(scores, ScoreSource)
        if not self.partial:
            return self._joined([], scores)
        if self.capacity is None:
            self.refill(scores)
        if self.host_partition:
            return self._host_select(scores)
        drift = scores.drift_tensor(self.reference)
        picks = []
        for bucket in self.buckets:
            chosen, kth, tied = bucket.kth_picks(scores, self.host_partition)
            room = (kth - bucket.floor - drift).amin()
            self.invalid |= room <= 0
            torch.minimum(self.room, room, out=self.room)
            if self._window_start:
                torch.minimum(self.start_room, room, out=self.start_room)
            self._tied = self._tied + tied
            picks.append(chosen)
        self._window_start = False
        return self._joined(picks, scores)

    def _host_select(self, scores: ScoreSource) -> torch.Tensor:
        """:meth:`select` in numpy on CPU tensors (see the module docstring)."""
        import torch

        drift = np.float32(scores.drift_host(self.reference))
        picks = []
        for bucket in self.buckets:
            chosen, kth, tied = bucket.host_picks(scores)
            room = float((kth - bucket.floor.numpy() - drift).min())
            state = self._host_room
            state[0] = state[0] or room <= 0
            state[1] = min(state[1], room)
            if self._window_start:
                state[2] = min(state[2], room)
            self._host_ties += tied
            picks.append(torch.from_numpy(chosen))
        self._window_start = False
        return self._joined(picks, scores)

    def window_end(self) -> tuple[bool, float, float]:
        """(every step since the last call was exact, the room at the window's first step, the
        smallest room seen): one host read."""
        import torch

        invalid, start, room = torch.stack([self.invalid.to(self.room.dtype), self.start_room, self.room]).tolist()
        host = self._host_room
        invalid, start, room = invalid or host[0], min(start, host[2]), min(room, host[1])
        self._host_room = [False, math.inf, math.inf]
        self.invalid.zero_()
        self.room.fill_(math.inf)
        self.start_room.fill_(math.inf)
        self._window_start = True
        return not invalid, start, room

    def _host_refill(self, pool: np.ndarray, layer_rows: list[int], rows: list[int], source: ScoreSource) -> np.ndarray:
        """:meth:`refill` of one bucket's ``pool`` (a numpy view) in numpy: each row's top C_r by
        introselect (several times ``topk``'s speed on the CPU), ascending; returns the rows' floors
        (the pool's smallest |S|). Which of several entries tied at the floor land in the pool does
        not matter: a selection is valid only while the k-th largest is above floor + drift."""
        floors = np.empty(len(rows), dtype=np.float32)
        for i, (r, cap) in enumerate(zip(layer_rows, rows)):
            layer = self.partial[r]
            if cap >= layer.numel:  # a pool holding its whole layer has nothing outside it
                pool[i, :cap] = np.arange(layer.offset, layer.offset + layer.numel)
                floors[i] = -math.inf
                continue
            values = source.layer_host(layer.offset, layer.numel)
            idx = np.argpartition(values, layer.numel - cap)[layer.numel - cap :]
            floors[i] = values[idx].min()
            idx.sort()
            pool[i, :cap] = idx + layer.offset
        return floors
