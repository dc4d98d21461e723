"""Per-pixel path counts for DPaI through the torch interpreter (mode="paths", masks as weights).

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
import sympy

from pai_compiler.errors import PaicError
from pai_compiler.ir import Graph, Node
from pai_compiler.passes.criteria.dpai.layout import Layout

if TYPE_CHECKING:
    import torch

__all__ = ["Convention", "PixelObjective", "input_bind", "path_inputs", "value_shapes", "finite", "layer_counts"]

Convention = Literal["ref", "exact"]


def input_bind(graph: Graph, extra: Mapping[str, int] | None = None) -> dict[str, int]:
    """Bind every free symbol of the input shapes to 1 (batch), unless ``extra`` says otherwise."""
    bind: dict[str, int] = {}
    for v in graph.inputs:
        for d in v.shape or ():
            if not isinstance(d, int):
                for sym in sympy.sympify(d).free_symbols:
                    bind.setdefault(str(sym), 1)
    bind.update(extra or {})
    return bind


def path_inputs(graph: Graph, bind: Mapping[str, int], dtype: torch.dtype, device: str | torch.device) -> list[torch.Tensor]:
    """All-ones inputs of the model's input shapes (batch 1)."""
    import torch

    from pai_compiler.interp import Interpreter

    it = Interpreter(graph, mode="paths", bind=bind)
    out = []
    for v in graph.inputs:
        if v.shape is None:
            raise PaicError(f"dpai: input {v.name!r} has an unknown shape")
        out.append(torch.ones(it.dims(v.shape), dtype=dtype, device=device))
    return out


def value_shapes(graph: Graph, bind: Mapping[str, int], device: str | torch.device) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every value, from one per-pixel path forward (no gradient)."""
    import torch

    from pai_compiler.interp import Interpreter

    shapes: dict[str, tuple[int, ...]] = {}
    it = Interpreter(graph, mode="paths", device=device, bind=bind, pool="model", scaling="dpai")
    inputs = path_inputs(graph, bind, torch.float32, device)
    for v, t in zip(graph.inputs, inputs):
        shapes[v.name] = tuple(t.shape)

    def record(node: Node, outs: list[torch.Tensor]) -> None:
        for v, t in zip(node.outputs, outs):
            shapes[v.name] = tuple(int(s) for s in t.shape)

    with torch.no_grad():
        it.run(inputs, on_node=record, keep_values=False)
    return shapes


class PixelObjective:
    """log P and dlogP/dM for flat 0/1 masks, per pixel, in the ``ref`` or ``exact`` convention."""

    def __init__(self, graph: Graph, layout: Layout, convention: Convention, device: str | torch.device, bind: Mapping[str, int]) -> None:
        import torch

        self.graph, self.layout, self.convention, self.device, self.bind = graph, layout, convention, device, dict(bind)
        self.dtype = torch.float32 if convention == "ref" else torch.float64
        self.mask = torch.zeros(layout.numel, dtype=self.dtype, device=device)
        self.inputs = path_inputs(graph, bind, self.dtype, device)

    def set_mask(self, keep_idx: torch.Tensor) -> None:
        import torch

        with torch.no_grad():
            self.mask.zero_()
            self.mask[keep_idx] = 1

    def log_paths(self, grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log P as a 0-d tensor, dlogP/dM over the flat layout or None)."""
        import torch

        from pai_compiler.interp import Interpreter

        leaf = self.mask.detach().requires_grad_(grad)
        weights = {layer.name: self.layout.natural(leaf, layer) for layer in self.layout.layers}
        ref = self.convention == "ref"
        it = Interpreter(
            self.graph, mode="paths", dtype=self.dtype, device=self.device, weights=weights,
            pool="model" if ref else "sum", scaling="dpai" if ref else "exact", bind=self.bind,
        )
        with torch.set_grad_enabled(grad):
            outs = it.run(self.inputs)
            if ref:
                log_p = torch.log(sum(o.sum() for o in outs)) + it.log_scale  # type: ignore[arg-type]
            else:
                terms = [torch.log(o.sum()) + torch.as_tensor(s, dtype=self.dtype, device=self.device) for o, s in zip(outs, it.out_log_scales)]
                log_p = torch.logsumexp(torch.stack(terms), 0)
        if not grad:
            return log_p.detach(), None
        if not log_p.requires_grad:  # nothing prunable reaches the output
            return log_p.detach(), torch.zeros_like(self.mask)
        (dmask,) = torch.autograd.grad(log_p, leaf)
        return log_p.detach(), dmask


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
