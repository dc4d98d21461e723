"""DPaI's per-pixel objective: log P and dlogP/dM over the flat mask, through ``analysis.paths``.

* ``ref``: the reference's R_P: all-ones input, pooling as in the model (mean/max), float32,
  each conv/linear input divided by its max, log P~ = log(sum(out)) + sum_l log m_l
  (skip-weighted on residual nets, algorithms.md §1.5).
* ``exact``: the true count, log P = log(sum(out)) in float64 log space, pooling as sums.

Both give dlogP/dM for every weight (kept or not) by autograd through the flat mask.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pai_compiler.ir import Graph, Node
from pai_compiler.passes.analysis.paths import Convention, count_paths, path_gradients
from pai_compiler.passes.criteria.dpai.layout import Layout

if TYPE_CHECKING:
    import torch

__all__ = ["PixelObjective", "value_shapes", "finite", "layer_counts"]


def value_shapes(graph: Graph, bind: Mapping[str, int], device: str | torch.device) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every value, from one per-pixel path forward (no gradient)."""
    import torch  # heavy optional dependency: only DPaI's objective needs it

    from pai_compiler.interp import bound_dims  # imports torch

    shapes: dict[str, tuple[int, ...]] = {v.name: tuple(bound_dims(v.shape or (), bind)) for v in graph.inputs}

    def record(node: Node, outs: list[torch.Tensor]) -> None:
        for v, t in zip(node.outputs, outs):
            shapes[v.name] = tuple(int(s) for s in t.shape)

    with torch.no_grad():
        count_paths(graph, "ref", bind, device=device, keep_values=False, on_node=record)
    return shapes


class PixelObjective:
    """log P and dlogP/dM for flat 0/1 masks, per pixel, in the ``ref`` or ``exact`` convention."""

    def __init__(self, graph: Graph, layout: Layout, convention: Convention, device: str | torch.device, bind: Mapping[str, int]) -> None:
        import torch  # heavy optional dependency: only DPaI's objective needs it

        self.graph, self.layout, self.convention, self.device, self.bind = graph, layout, convention, device, dict(bind)
        self.dtype = torch.float32 if convention == "ref" else torch.float64
        self.mask = torch.zeros(layout.numel, dtype=self.dtype, device=device)

    def set_mask(self, keep_idx: torch.Tensor) -> None:
        import torch  # heavy optional dependency: only DPaI's objective needs it

        with torch.no_grad():
            self.mask.zero_()
            self.mask[keep_idx] = 1

    def log_paths(self, grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log P as a 0-d tensor, dlogP/dM over the flat layout or None)."""
        import torch  # heavy optional dependency: only DPaI's objective needs it

        leaf = self.mask.detach().requires_grad_(grad)
        weights = {layer.name: self.layout.natural(leaf, layer) for layer in self.layout.layers}
        with torch.set_grad_enabled(grad):
            log_p = count_paths(self.graph, self.convention, self.bind, dtype=self.dtype, device=self.device, weights=weights).log_paths
        if not grad:
            return log_p.detach(), None
        (dmask,) = path_gradients(log_p, [leaf])  # None: nothing prunable reaches the output
        return log_p.detach(), torch.zeros_like(self.mask) if dmask is None else dmask


def finite(x: Any) -> float | None:
    value = float(x)
    return value if math.isfinite(value) else None


def layer_counts(layout: Layout, flags: np.ndarray, per: Literal["node", "kernel"]) -> list[int]:
    """Split flat node (or kernel) flags into per-layer counts."""
    out = []
    for layer in layout.layers:
        start, size = (layer.node_offset, layer.out_ch) if per == "node" else (layer.kernel_offset, layer.kernels)
        out.append(int(np.count_nonzero(flags[start : start + size])))
    return out
