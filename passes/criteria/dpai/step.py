"""DPaI's effective-weight flags and surrogate score gradient (algorithms.md §1.6) on the flat layout.

With g = sign(S) * dlogP/dM (STE through |S|):

    E[e]        = 1[|g_e| M_e > 0]                    effective weight
    kernel[o,i] = 1[sum over taps of E > 0]            (linear: the weight itself)
    node[o]     = 1[sum over (in, taps) of E > 0]      output channel of each layer
    S.grad      = -[(1-a) g + a((1-b) g (1-node[o]) + b g (1-kernel[o,i]))]

Flags only ever need the kept entries. The update is S.grad = g * c with the per-kernel
coefficient c = (a(1-b) node[o] - 1) + a b kernel[o,i] (the same expression, regrouped). It is
applied per kernel where g is constant over taps (channel mode, then expanded with sign(S))
or per weight (per-pixel modes): one formula, so both agree bit for bit.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pai_compiler.passes.criteria.dpai.layout import Layout

if TYPE_CHECKING:
    import torch

__all__ = ["Kept", "SurrogateUpdate", "combine", "NODE_MAP_MAX"]

#: up to this many kernels ``per_kernel`` gathers through a kernel -> node map (8 B per kernel)
NODE_MAP_MAX = 1 << 20


def combine(g: torch.Tensor, not_node: torch.Tensor, not_kernel: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """-[(1-a) g + a((1-b) g(1-node) + b g(1-kernel))], term by term as the reference writes it.

    The reference formula, kept for tests; the loop uses :meth:`SurrogateUpdate.coefficient`.
    """
    node_grad = g * not_node
    kernel_grad = g * not_kernel
    return -((1 - alpha) * g + alpha * ((1 - beta) * node_grad + beta * kernel_grad))


@dataclass
class Kept:
    """Per kept entry: its flat index, kernel, node, and (with dead taps) tap liveness."""

    index: torch.Tensor
    kernel: torch.Tensor
    node: torch.Tensor
    live: torch.Tensor | None


class SurrogateUpdate:
    """Index maps and buffers for the flags and the score gradient."""

    def __init__(self, layout: Layout, order: Sequence[int], alpha: float, beta: float, device: str | torch.device) -> None:
        import torch

        self.layout, self.alpha, self.beta, self.device = layout, float(alpha), float(beta), device
        host = layout.keep_metadata(order)
        layer_of = host.pop("layer")
        small = np.int32 if max(layout.numel, layout.n_kernels, layout.n_nodes) < 2**31 else np.int64  # 4 bytes per kept entry and field
        meta = {k: torch.as_tensor(v.astype(small), device=device) for k, v in host.items()}
        self.meta = meta
        # consecutive layers with equal in_ch: nodes and kernels contiguous, kernels = nodes x in_ch
        self.node_runs: list[tuple[int, int, int, int, int]] = []  # (node start, node stop, kernel start, kernel stop, in_ch)
        for layer in layout.layers:
            last = self.node_runs[-1] if self.node_runs else None
            if last is not None and last[4] == layer.in_ch and last[1] == layer.node_offset:
                self.node_runs[-1] = (last[0], layer.node_offset + layer.out_ch, last[2], layer.kernel_offset + layer.kernels, layer.in_ch)
            else:
                self.node_runs.append((layer.node_offset, layer.node_offset + layer.out_ch, layer.kernel_offset, layer.kernel_offset + layer.kernels, layer.in_ch))
        self.dtype = torch.float32
        # small models: one gather beats a copy per run (per-op cost dominates); big ones keep the runs
        self.node_of_kernel: torch.Tensor | None = None
        if layout.n_kernels <= NODE_MAP_MAX:
            node_of = [np.repeat(np.arange(n0, n1, dtype=np.int64), in_ch) for n0, n1, _, _, in_ch in self.node_runs]
            self.node_of_kernel = torch.as_tensor(np.concatenate(node_of) if node_of else np.zeros(0, np.int64), device=device)
        self.ones = torch.ones(len(meta["offset"]), dtype=self.dtype, device=device)
        self.live_table: torch.Tensor | None = None
        if layout.tap_live:
            table, starts = [], []
            for layer in layout.layers:
                starts.append(sum(len(t) for t in table))
                table.append(layout.tap_live.get(layer.name, np.ones(layer.taps, dtype=bool)).astype(np.float32))
            self.live_table = torch.as_tensor(np.concatenate(table), device=device)
            self.live_start = torch.as_tensor(np.asarray(starts, dtype=np.int64)[layer_of], device=device)
        self.live_segments = {
            i: torch.as_tensor(seg.live, dtype=self.dtype, device=device).view(1, -1) for i, seg in enumerate(layout.segments) if seg.live is not None
        }

    def kept(self, keep_idx: torch.Tensor) -> Kept:
        m = self.meta
        local = keep_idx - m["offset"]
        kernel = m["kernel_offset"] + torch_div(local, m["taps"])
        node = m["node_offset"] + torch_div(local, m["in_taps"])
        live = None
        if self.live_table is not None:
            live = self.live_table[self.live_start + local % m["taps"]]
        return Kept(keep_idx, kernel, node, live)

    def node_flags(self, effective: torch.Tensor, kept: Kept) -> torch.Tensor:
        """0/1 per node: an output channel with at least one effective kept weight."""
        import torch

        nodes = torch.zeros(self.layout.n_nodes, dtype=self.dtype, device=self.device).index_add_(0, kept.node, effective.to(self.dtype))
        return (nodes > 0).to(self.dtype)

    def kernel_flags(self, effective: torch.Tensor, kept: Kept) -> torch.Tensor:
        """0/1 per kernel: a kernel with at least one effective kept weight (dense, n_kernels)."""
        import torch

        kernels = torch.zeros(self.layout.n_kernels, dtype=self.dtype, device=self.device).index_add_(0, kept.kernel, effective.to(self.dtype))
        return (kernels > 0).to(self.dtype)

    def coefficient(self, nodes: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        """c per kernel with S.grad = g * c: (a(1-b) node[o] - 1) + a b kernel[o,i] (dense kernel flags)."""
        return self.per_kernel(nodes * (self.alpha * (1 - self.beta)) - 1.0).add_(kernels, alpha=self.alpha * self.beta)

    def kernel_gradient(self, nodes: torch.Tensor, kept: Kept, kernel_flag: torch.Tensor, wgrad: torch.Tensor, out: torch.Tensor,
                        at_kept: torch.Tensor) -> torch.Tensor:
        """G = c * dlogP/dW per kernel into ``out``, kernel flags per kept entry (equal for every
        entry of a kernel: only kernels holding kept weights can be effective). c is never
        materialised on big models: one product per run of equal in_ch, then the kept kernels
        again with their flag (c_node + 0 = c_node, so every product is the one c * dlogP/dW gives).
        ``at_kept``: ``wgrad[kept.kernel]``, gathered once by the caller (its flags read it too)."""
        import torch

        per_node = nodes * (self.alpha * (1 - self.beta)) - 1.0
        bonus = kernel_flag * (self.alpha * self.beta)
        if self.node_of_kernel is not None:
            c = per_node.index_select(0, self.node_of_kernel)
            c[kept.kernel] = c[kept.kernel] + bonus
            return torch.mul(c, wgrad, out=out)
        for n0, n1, k0, k1, in_ch in self.node_runs:
            torch.mul(wgrad[k0:k1].view(n1 - n0, in_ch), per_node[n0:n1].unsqueeze(1), out=out[k0:k1].view(n1 - n0, in_ch))
        out[kept.kernel] = (per_node[kept.node] + bonus) * at_kept
        return out

    def per_kernel(self, per_node: torch.Tensor) -> torch.Tensor:
        """Each node's value on its kernels (a broadcast per run of equal in_ch; ``repeat_interleave``
        builds an index the size of all kernels and is ~30x slower on big models)."""
        import torch

        if self.node_of_kernel is not None:
            return per_node.index_select(0, self.node_of_kernel)
        out = torch.empty(self.layout.n_kernels, dtype=per_node.dtype, device=per_node.device)
        for n0, n1, k0, k1, in_ch in self.node_runs:
            out[k0:k1].view(n1 - n0, in_ch).copy_(per_node[n0:n1].unsqueeze(1))
        return out

    def expand_into(self, out: torch.Tensor, sign: torch.Tensor | None, per_kernel: torch.Tensor) -> None:
        """out[e] = sign[e] * per_kernel[kernel(e)] * live(e), one broadcast per segment.

        ``sign=None``: ``out`` already holds sign(S) and is scaled in place (the same products).
        """
        import torch

        for i, seg in enumerate(self.layout.segments):
            view = out[seg.start : seg.stop].view(-1, seg.taps)
            factor = per_kernel[seg.kernel_start : seg.kernel_stop].unsqueeze(1)
            if sign is None:
                view.mul_(factor)
            else:
                torch.mul(sign[seg.start : seg.stop].view(-1, seg.taps), factor, out=view)
            if i in self.live_segments:
                view.mul_(self.live_segments[i])

    def weight_grad_into(self, out: torch.Tensor, g: torch.Tensor, kernels: torch.Tensor, nodes: torch.Tensor) -> None:
        """out[e] = g[e] * c[kernel(e)], the coefficient broadcast over taps."""
        import torch

        c = self.coefficient(nodes, kernels).to(g.dtype)
        for seg in self.layout.segments:
            gv = g[seg.start : seg.stop].view(-1, seg.taps)
            out[seg.start : seg.stop].view(-1, seg.taps).copy_(torch.mul(gv, c[seg.kernel_start : seg.kernel_stop].unsqueeze(1)))


def torch_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.div(a, b, rounding_mode="floor")
