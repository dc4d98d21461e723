"""Flat layout of DPaI's per-weight state: scores, masks, kernels and nodes of every layer.

Each prunable weight is viewed in (out, in, taps...) order (``Param.to_oi``: for a conv
(O, I/g, kh, kw) that is its own order, for a ``[in, out]`` MatMul weight the transpose) and
flattened; layers are concatenated in graph order. A *kernel* is one (out, in) pair with its
``taps`` = prod(spatial) entries (a linear weight is its own kernel), a *node* one output
channel. Entry e of layer l lies in

    kernel(e) = kernel_offset_l + (e - offset_l) // taps_l
    node(e)   = node_offset_l   + (e - offset_l) // (in_l * taps_l)

Consecutive layers with equal ``taps`` form a *segment*: contiguous both in entries and in
kernels, so a kernel-level tensor expands over taps with one broadcast per segment.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pai_compiler.errors import UsageError
from pai_compiler.ir import Param

if TYPE_CHECKING:
    import torch

__all__ = ["LayerInfo", "Segment", "Layout"]


@dataclass(frozen=True)
class LayerInfo:
    """One prunable weight in the flat layout."""

    index: int
    param: Param
    perm: tuple[int, ...]  # natural axes listed in (out, in, taps...) order
    oi_shape: tuple[int, ...]
    out_ch: int
    in_ch: int
    taps: int
    keep: int
    offset: int
    kernel_offset: int
    node_offset: int

    @property
    def name(self) -> str:
        return self.param.name

    @property
    def numel(self) -> int:
        return self.out_ch * self.in_ch * self.taps

    @property
    def kernels(self) -> int:
        return self.out_ch * self.in_ch


@dataclass(frozen=True)
class Segment:
    """Consecutive layers with equal taps (and no dead taps, unless ``live`` is given)."""

    start: int
    stop: int
    kernel_start: int
    kernel_stop: int
    taps: int
    live: tuple[float, ...] | None = None  # per-tap 0/1 liveness of a single layer


class Layout:
    """Offsets and index maps of the flat score/mask buffers (host side, numpy)."""

    def __init__(self, params: Sequence[Param], keep: Mapping[str, int], tap_live: Mapping[str, np.ndarray] | None = None) -> None:
        layers: list[LayerInfo] = []
        offset = kernel_offset = node_offset = 0
        for index, p in enumerate(params):
            perm = [p.out_axis] + ([p.in_axis] if p.in_axis is not None else [])
            perm += [a for a in range(len(p.shape)) if a not in perm]
            oi_shape = tuple(p.shape[a] for a in perm)
            out_ch = oi_shape[0]
            in_ch = oi_shape[1] if p.in_axis is not None else 1
            taps = math.prod(oi_shape[2:] if p.in_axis is not None else oi_shape[1:])
            k = int(keep[p.name]) if p.name in keep else -1
            if not 0 <= k <= p.numel:
                raise UsageError(f"dpai: keep count {k} for {p.name!r} is outside [0, {p.numel}]")
            layers.append(LayerInfo(index, p, tuple(perm), oi_shape, out_ch, in_ch, taps, k, offset, kernel_offset, node_offset))
            offset += p.numel
            kernel_offset += out_ch * in_ch
            node_offset += out_ch
        self.layers = layers
        self.numel, self.n_kernels, self.n_nodes = offset, kernel_offset, node_offset
        self.total_keep = sum(layer.keep for layer in layers)
        self.tap_live = {name: np.asarray(v, dtype=bool) for name, v in (tap_live or {}).items() if not np.all(v)}
        self.segments = self._segments()

    def _segments(self) -> list[Segment]:
        segments: list[Segment] = []
        for layer in self.layers:
            live = self.tap_live.get(layer.name)
            if live is None and segments and segments[-1].live is None and segments[-1].taps == layer.taps:
                last = segments[-1]
                segments[-1] = Segment(last.start, layer.offset + layer.numel, last.kernel_start, layer.kernel_offset + layer.kernels, layer.taps)
                continue
            segments.append(
                Segment(
                    layer.offset,
                    layer.offset + layer.numel,
                    layer.kernel_offset,
                    layer.kernel_offset + layer.kernels,
                    layer.taps,
                    None if live is None else tuple(float(x) for x in live),
                )
            )
        return segments

    # ---- index maps (torch, on a device) -------------------------------------------------
    def kernels_per_node(self, device: str | torch.device) -> torch.Tensor:
        """in_ch of each node's layer (int64, n_nodes): ``x.repeat_interleave(this)`` takes a
        per-node tensor to kernels (a node's kernels are consecutive), with no per-kernel index."""
        import torch

        parts = [np.full(layer.out_ch, layer.in_ch, dtype=np.int64) for layer in self.layers]
        return torch.as_tensor(np.concatenate(parts) if parts else np.zeros(0, np.int64), device=device)

    def keep_metadata(self, order: Sequence[int]) -> dict[str, np.ndarray]:
        """Per kept entry (layers in ``order``, each repeated ``keep`` times): offsets and taps."""
        reps = [self.layers[i].keep for i in order]
        pick = lambda attr: np.repeat(np.array([getattr(self.layers[i], attr) for i in order], dtype=np.int64), reps)  # noqa: E731
        return {"offset": pick("offset"), "kernel_offset": pick("kernel_offset"), "taps": pick("taps"), "in_taps": pick("in_ch") * pick("taps"), "node_offset": pick("node_offset"), "layer": np.repeat(np.asarray(order, dtype=np.int64), reps)}

    def natural(self, flat: torch.Tensor, layer: LayerInfo) -> torch.Tensor:
        """View of ``flat``'s slice for ``layer`` in the weight's own axis order."""
        view = flat[layer.offset : layer.offset + layer.numel].view(layer.oi_shape)
        inverse = tuple(int(a) for a in np.argsort(layer.perm))
        return view if inverse == tuple(range(len(inverse))) else view.permute(inverse)

    def masks(self, keep_idx: np.ndarray) -> dict[str, np.ndarray]:
        """Bool masks in each weight's natural shape from flat kept-entry indices."""
        flat = np.zeros(self.numel, dtype=bool)
        flat[np.asarray(keep_idx, dtype=np.int64)] = True
        out = {}
        for layer in self.layers:
            oi = flat[layer.offset : layer.offset + layer.numel].reshape(layer.oi_shape)
            out[layer.name] = np.transpose(oi, np.argsort(layer.perm))
        return out

    def flat_mask(self, masks: Mapping[str, np.ndarray]) -> np.ndarray:
        """Inverse of :meth:`masks`: natural-shape bool masks -> flat (oi order) bool vector."""
        parts = [np.transpose(np.asarray(masks[layer.name], dtype=bool), layer.perm).reshape(-1) for layer in self.layers]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
