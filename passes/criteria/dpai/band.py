"""Band tracking: in a short run only the scores that can cross a layer's top-k boundary are stored.

Step t moves any score by at most d_t = lr * adam_step_bound(t) (1 + 1e-3) + 1e-6 (the bound
the incremental top-k uses), so after T steps |S_e - S0_e| <= D = sum_t d_t for every entry,
and the k-th largest |S| of a layer stays within D of its initial value t0. With
r = 2D + delta (delta = 1e-3 (1 + t0), float slack):

    A = {e : |S0_e| > t0 + r}          kept at every step: |S_e| > t0 + D + delta > k-th largest
    B = {e : t0 - r <= |S0_e| <= t0 + r}  the band, the only entries that need a score
    rest = {e : |S0_e| < t0 - r}        never kept: |S_e| < t0 - D - delta < k-th largest

so the layer's kept set is A + the top-(k - |A|) of B (ties, all inside B, go to the lower flat
index: B is stored in flat order). Only B gets a score, Adam moments and a gradient (16 bytes),
its local index (8) and, with dead taps, its tap liveness (4); A is a sorted int32 list of local
indices. A band is a few percent of the weights for tens of steps at lr 0.005 and grows with
T * lr; ``band_fraction`` predicts it for N(0, 1) scores so the caller can pick this mode or the
full state. Scores are drawn exactly as ``initial_scores`` draws them (same generator order).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np

from pai_compiler.passes.criteria.dpai.layout import Layout
from pai_compiler.passes.criteria.dpai.select import adam_step_bound

if TYPE_CHECKING:
    import torch

__all__ = ["drift_bound", "band_fraction", "Span", "Band", "BandState"]


def drift_bound(steps: int, lr: float) -> float:
    """D: bound on any score's total movement over ``steps`` Adam steps (as the loop sums it)."""
    return sum(lr * adam_step_bound(t + 1) * (1 + 1e-3) + 1e-6 for t in range(steps))


def _reach(t0: float, drift: float) -> float:
    return 2.0 * drift + 1e-3 * (1.0 + t0)


def band_fraction(sizes: Iterable[tuple[int, int]], steps: int, lr: float) -> float:
    """Expected share of the weights inside the bands, for N(0, 1) scores; sizes = (numel, keep)."""
    normal, drift = NormalDist(), drift_bound(steps, lr)
    inside = total = 0.0
    for numel, keep in sizes:
        total += numel
        if 0 < keep < numel:
            t0 = normal.inv_cdf(1.0 - 0.5 * keep / numel)  # P(|Z| > t0) = density
            r = _reach(t0, drift)
            inside += numel * 2.0 * (normal.cdf(t0 + r) - normal.cdf(max(t0 - r, 0.0)))
    return min(1.0, inside / max(total, 1.0))


@dataclass(frozen=True)
class Span:
    """One layer's band in the compact vectors, as the top-k sees it (keep = k - |A|)."""

    index: int
    offset: int
    numel: int
    keep: int


@dataclass
class Band:
    """One layer: its always-kept entries and its band (local flat indices in oi order)."""

    span: Span
    always: Any  # int32 local indices of A (sorted), or None when the layer is kept whole
    local: Any  # int64 local indices of B (sorted)
    live: Any  # float32 tap liveness per band entry, or None (no dead taps)
    base: Any  # float32 live kept taps of A per kernel (convs, dead taps), or None: W from ``always``


class BandState:
    """Bands of every layer, the compact leaf ``scores`` over them and the masks they give."""

    def __init__(self, layout: Layout, seed: int, drift: float, device: str | torch.device) -> None:
        import torch

        self.layout, self.device, self.drift = layout, device, float(drift)
        gen = torch.Generator().manual_seed(int(seed))
        self.bands: list[Band] = []
        parts, offset = [], 0
        for layer in layout.layers:
            s0 = torch.randn(layer.param.shape, generator=gen).permute(layer.perm).reshape(-1)
            a = s0.abs()
            whole = layer.keep == layer.numel
            if 0 < layer.keep < layer.numel:
                t0 = float(torch.kthvalue(a, layer.numel - layer.keep + 1).values)
                above = a > t0 + _reach(t0, self.drift)
                local = torch.nonzero((a >= t0 - _reach(t0, self.drift)) & ~above).squeeze(1)
            else:
                above = torch.full((layer.numel,), whole)
                local = torch.zeros(0, dtype=torch.int64)
            del a
            always = None if whole else torch.nonzero(above).squeeze(1).to(torch.int32)
            n_above = layer.numel if whole else int(always.numel())
            tap_live = layout.tap_live.get(layer.name)
            live = base = None
            if tap_live is not None or layer.taps > 1:
                tl = torch.as_tensor(np.ones(layer.taps, bool) if tap_live is None else tap_live)
                base = (above.view(layer.kernels, layer.taps) & tl).sum(1, dtype=torch.float32).to(device)
                if tap_live is not None:
                    live = tl.to(torch.float32)[local % layer.taps].to(device)
            parts.append(s0[local])
            span = Span(layer.index, offset, int(local.numel()), layer.keep - n_above)
            self.bands.append(Band(span, None if always is None else always.to(device), local.to(device), live, base))
            offset += span.numel
        self.numel = offset
        self.layers = [band.span for band in self.bands]  # the top-k's layout
        self.scores = (torch.cat(parts) if parts else torch.zeros(0)).to(device).requires_grad_(True)

    def flags(self, picked: torch.Tensor) -> torch.Tensor:
        """Bool per band entry: picked by the top-k."""
        import torch

        flags = torch.zeros(self.numel, dtype=torch.bool, device=self.device)
        flags[picked] = True
        return flags

    def layer_mask(self, index: int, flags: torch.Tensor) -> torch.Tensor:
        """Bool kept mask of layer ``index`` (flat, oi order) for band flags ``flags``."""
        import torch

        layer, band = self.layout.layers[index], self.bands[index]
        if band.always is None:
            return torch.ones(layer.numel, dtype=torch.bool, device=self.device)
        mask = torch.zeros(layer.numel, dtype=torch.bool, device=self.device)
        mask[band.always] = True
        span = band.span
        mask[band.local[flags[span.offset : span.offset + span.numel]]] = True
        return mask

    def masks(self, flags: torch.Tensor) -> dict[str, np.ndarray]:
        """Bool masks in each weight's natural shape."""
        out = {}
        for layer in self.layout.layers:
            oi = self.layer_mask(layer.index, flags).cpu().numpy().reshape(layer.oi_shape)
            out[layer.name] = np.transpose(oi, np.argsort(layer.perm))
        return out
