"""The channel-level DPaI step on band state (``_dpai_band``), one layer at a time.

Nothing kernel- or weight-sized outlives a layer: the tape asks each layer for its kernel-level
W (kept live taps per kernel: A's count plus the picked band entries) when it needs it, and
hands back G = dlogP/dW once every use of the layer has run its backward. Then, per layer,

    eff[k]    = W[k] > 0 and G[k] != 0        (the kernel holds an effective kept weight)
    node[o]   = any eff[k] over the kernels (o, .);  kernels = sum eff;  params = sum W[eff]
    c[k]      = (a(1-b) node[o] - 1) + a b eff[k]
    S.grad[e] = sign(S_e) * (G[k] c[k]) * live(e)   for every band entry e of kernel k

These are the float32 operations of ``ChannelStep`` + ``SurrogateUpdate`` on the full state, in
the same order (eff[k] is their per-kept-entry flag ``moving & counts > 0``; a kernel without
kept entries gets c + 0 = c), so a band run reproduces the full run bit for bit.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pai_compiler.passes.criteria.dpai.band import BandState
from pai_compiler.passes.criteria.dpai.layout import LayerInfo, Layout
from pai_compiler.passes.criteria.dpai.loop import Measure
from pai_compiler.passes.criteria.dpai.tape import WeightSource

if TYPE_CHECKING:
    import torch

    from pai_compiler.passes.criteria.dpai.channel_program import ChannelProgram

__all__ = ["BandWeight", "BandStep"]


class BandWeight(WeightSource):
    """A prunable layer's W, rebuilt from the band state on each request; G goes to the step."""

    def __init__(self, step: BandStep, layer: LayerInfo, uses: int) -> None:
        self.step, self.layer, self.uses = step, layer, uses
        self.pending: Any = None
        self.seen = 0

    def matrix(self) -> Any:
        ops = self.step.program.ops
        return ops.wrap(self.step.counts(self.layer.index)).reshape(self.layer.out_ch, self.layer.in_ch)

    def put_grad(self, gw: Any | None, accumulate: bool, w: Any) -> None:
        if self.uses > 1:  # backward order: the first call writes, later ones add
            if gw is not None:
                self.pending = gw if self.pending is None or not accumulate else self.pending + gw
            elif not accumulate:
                self.pending = None
            self.seen += 1
            if self.seen < self.uses:
                return
            gw, self.pending, self.seen = self.pending, None, 0
        self.step.consume(self.layer, gw, self.matrix() if w is None else w)


class BandStep:
    """``step(scores, flags, grad_out) -> Measure`` on band state; ``program`` is set by the caller."""

    def __init__(self, state: BandState, layout: Layout, alpha: float, beta: float, device: str | torch.device) -> None:
        import torch

        self.state, self.layout, self.alpha, self.beta, self.device = state, layout, float(alpha), float(beta), device
        self.program: ChannelProgram
        self.nodes = torch.zeros(layout.n_nodes, dtype=torch.float32, device=device)
        self.picked: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.kernel_of = [band.local if layer.taps == 1 else band.local // layer.taps for band, layer in zip(state.bands, layout.layers)]
        self.counted: list[torch.Tensor] = []
        self.scores: torch.Tensor | None = None
        self.grad_out: torch.Tensor | None = None

    def source(self, layer: LayerInfo, uses: int) -> WeightSource:
        return BandWeight(self, layer, uses)

    def counts(self, index: int) -> torch.Tensor:
        """W of layer ``index``, flat over its kernels: kept live taps per kernel."""
        import torch

        layer, band = self.layout.layers[index], self.state.bands[index]
        if band.base is not None:
            w = band.base.clone()
        else:
            w = torch.zeros(layer.kernels, dtype=torch.float32, device=self.device)
            if band.always is None:
                w.fill_(1.0)
            elif band.always.numel():
                w[band.always] = 1.0
        kernels, values = self.picked[index]
        if kernels.numel():
            if values is None and band.base is None:  # one tap per kernel, all live
                w[kernels] = 1.0
            else:
                w.index_add_(0, kernels, torch.ones(kernels.numel(), device=self.device) if values is None else values)
        return w

    def __call__(self, scores: torch.Tensor, flags: torch.Tensor, grad_out: torch.Tensor | None) -> Measure:
        import torch

        self.scores, self.grad_out = scores.detach(), grad_out
        for band, kernel_of in zip(self.state.bands, self.kernel_of):
            span = band.span
            mine = flags[span.offset : span.offset + span.numel]
            self.picked[span.index] = (kernel_of[mine], None if band.live is None else band.live[mine])
        self.nodes.zero_()
        self.counted = []
        if grad_out is not None:
            grad_out.zero_()
        with torch.no_grad():
            log_p = self.program.forward_backward()
        counted = self.counted
        zero = torch.zeros(2, dtype=torch.float64, device=self.device)
        totals = torch.stack(counted).sum(0) if counted else zero
        return Measure(log_p, totals[1], self.nodes, lambda: totals[0])

    def consume(self, layer: LayerInfo, gw: Any | None, w: Any) -> None:
        """One layer's complete G: node flags, counts and the band's score gradient."""
        import torch

        if gw is None:
            return
        ops, band, span = self.program.ops, self.state.bands[layer.index], self.state.bands[layer.index].span
        g, w_t = ops.to_torch(gw).reshape(-1), ops.to_torch(w).reshape(-1)
        eff = (g != 0) & (w_t > 0)
        node = eff.view(layer.out_ch, layer.in_ch).any(1)
        self.nodes[layer.node_offset : layer.node_offset + layer.out_ch] = node
        n_eff = eff.sum(dtype=torch.float64)
        self.counted.append(torch.stack([n_eff, n_eff if layer.taps == 1 else w_t[eff].sum(dtype=torch.float64)]))
        if self.grad_out is None or not span.numel:
            return
        assert self.scores is not None
        k = self.kernel_of[layer.index]
        c = node[k // layer.in_ch].to(torch.float32) * (self.alpha * (1 - self.beta)) - 1.0
        c = c + eff[k].to(torch.float32) * (self.alpha * self.beta)
        out = self.grad_out[span.offset : span.offset + span.numel]
        torch.mul(torch.sign(self.scores[span.offset : span.offset + span.numel]), g[k] * c, out=out)
        if band.live is not None:
            out.mul_(band.live)
