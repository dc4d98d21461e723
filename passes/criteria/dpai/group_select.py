"""DPaI's selection on N:M-patterned layers: the N highest |S| of every M consecutive inputs, every step.

A layer the allocation gave an N:M pattern is binarised by its groups instead of a layer-wide
top-k. In the flat (out, in, taps) layout (``layout.py``) the entries of layer l form the view
(O, I/M, M, T); group (o, g, t) holds the M inputs g*M .. g*M+M-1 at one output and tap, the same
groups as ``allocation/pattern.py`` (input axis last there: the same members, in the same order),
and the rule is its ``group_ranks``: kept iff rank < N, ties to the lower input index. Every group
keeps exactly N, so the layer keeps numel * N / M, the allocation's count.

There is no pool to maintain: each step reads the layer's |S| once (``ScoreSource.layer``), ranks
it (M comparisons per pair of group members, on rows of all groups: ``group_ranks``) and lists
the kept flat indices in ascending order. The device path does that with fixed
shapes (the kept count is known: a cumsum scatter, no ``nonzero``, no host read); the host path
(CPU tensors) runs the same rank rule in numpy on ``ScoreSource.layer_host``, the same float32
values, and lists the same indices in the same order.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from pai_compiler.passes.allocation.pattern import NMPattern, group_ranks
from pai_compiler.passes.criteria.dpai.kernel_state import ScoreSource
from pai_compiler.passes.criteria.dpai.layout import LayerInfo, Layout

if TYPE_CHECKING:
    import torch

__all__ = ["GroupTopN"]


class GroupTopN:
    """Kept flat indices of the patterned layers, layer after layer (ascending within a layer)."""

    def __init__(self, layout: Layout, patterns: Mapping[str, NMPattern], device: str | torch.device) -> None:
        self.layers = [layer for layer in layout.layers if layer.name in patterns] if patterns else []  # (a band state's layers have no name)
        self.patterns = [patterns[layer.name] for layer in self.layers]
        self.device = device
        for layer, pattern in zip(self.layers, self.patterns):
            assert layer.in_ch % pattern.m == 0 and layer.keep * pattern.m == layer.numel * pattern.n, layer.name
        self._host: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @staticmethod
    def shape(layer: LayerInfo, pattern: NMPattern) -> tuple[int, int, int]:
        """(groups along out x in, M, taps): the layer's flat slice grouped; ``group_ranks`` reads it with M first."""
        return layer.out_ch * (layer.in_ch // pattern.m), pattern.m, layer.taps

    def _buffers(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The layer's |S| with M first (float32) and its ranks (uint8), host side, kept across steps."""
        if i not in self._host:
            groups, m, taps = self.shape(self.layers[i], self.patterns[i])
            self._host[i] = (np.empty((m, groups, taps), dtype=np.float32), np.empty((m, groups, taps), dtype=np.uint8))
        return self._host[i]

    def picks(self, source: ScoreSource) -> list[torch.Tensor]:
        """One int64 tensor of kept flat indices per patterned layer (fixed shapes, no host read)."""
        import torch

        out = []
        for layer, pattern in zip(self.layers, self.patterns):
            grouped = source.layer(layer.offset, layer.numel).view(self.shape(layer, pattern)).transpose(0, 1)  # (M, groups, taps)
            ranks = group_ranks(grouped, torch.empty(grouped.shape, dtype=torch.uint8, device=grouped.device))
            keep = (ranks < pattern.n).transpose(0, 1).reshape(-1)
            slot = torch.cumsum(keep, 0).sub_(1).where(keep, layer.keep)  # rank among the kept, or the dump slot
            listed = torch.empty(layer.keep + 1, dtype=torch.int64, device=keep.device)
            listed.scatter_(0, slot, torch.arange(layer.offset, layer.offset + layer.numel, device=keep.device))
            out.append(listed[: layer.keep])
        return out

    def host_picks(self, source: ScoreSource) -> list[np.ndarray]:
        """:meth:`picks` in numpy (CPU tensors): the same ranks, indices and order."""
        out = []
        for i, (layer, pattern) in enumerate(zip(self.layers, self.patterns)):
            grouped, ranks = self._buffers(i)
            np.copyto(grouped, source.layer_host(layer.offset, layer.numel).reshape(self.shape(layer, pattern)).transpose(1, 0, 2))
            keep = group_ranks(grouped, ranks) < pattern.n
            out.append(np.flatnonzero(keep.transpose(1, 0, 2)) + layer.offset)
        return out
