"""The DPaI loop: masks = per-layer top-k of |S| -> path gradient -> surrogate -> Adam, T times.

Step t (t = 0..T-1) measures the mask of the current scores, writes
S.grad = -[(1-a) g + a((1-b) node_grad + b kernel_grad)] and takes one Adam step (torch
defaults, constant lr, the fused kernel where the device has one). A final measurement follows
the last step, as in the reference. Statistics are read back (one device sync) only every
``record_every`` steps for the trajectory and every ``progress_every`` for the progress bar.
``prepare`` turns the top-k's picks into what the step takes (``SurrogateUpdate.kept`` for the
full state, band flags for ``_dpai_band``); S.grad is dropped after the last step.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pai_compiler.passes.criteria.dpai.channel_program import ChannelProgram
from pai_compiler.passes.criteria.dpai.kernel_state import ScoreSource
from pai_compiler.passes.criteria.dpai.pixel_paths import PixelObjective
from pai_compiler.passes.criteria.dpai.select import IncrementalTopK, adam_step_bound
from pai_compiler.passes.criteria.dpai.step import Kept, SurrogateUpdate

if TYPE_CHECKING:
    import torch

__all__ = ["Adam", "Measure", "ChannelStep", "KernelStep", "PixelStep", "LoopResult", "optimise"]


@dataclass
class Measure:
    """One step's measurement, still on the device (``kernel_count`` is evaluated on read)."""

    log_paths: torch.Tensor
    effective: torch.Tensor  # per kept entry
    nodes: torch.Tensor  # 0/1 per node
    kernel_count: Callable[[], torch.Tensor]

    def read(self) -> dict[str, float | int]:
        import torch

        counts = (self.nodes.sum(), self.kernel_count(), self.effective.sum())
        values = torch.stack([self.log_paths.float().cpu().double(), *(t.double().cpu() for t in counts)]).tolist()
        return {"log_paths": values[0], "nodes": int(values[1]), "kernels": int(values[2]), "params": int(values[3])}


class ChannelStep:
    """Channel-level R_P (the fast default): kernel-level gradient, expanded over taps."""

    def __init__(self, program: ChannelProgram, update: SurrogateUpdate) -> None:
        self.program, self.update = program, update

    def __call__(self, scores: torch.Tensor, kept: Kept, grad_out: torch.Tensor | None) -> Measure:
        import torch

        program, update = self.program, self.update
        with torch.no_grad():
            program.counts.zero_()
            program.counts.index_add_(0, kept.kernel, update.ones if kept.live is None else kept.live)
        with torch.no_grad():
            log_p = program.forward_backward()
            wgrad, counts = program.grad, program.counts
            moving = wgrad[kept.kernel] != 0
            effective = moving if kept.live is None else moving & (kept.live > 0)
            nodes = update.node_flags(effective, kept)
            if grad_out is not None:
                kernel_flag = (moving & (counts[kept.kernel] > 0)).to(wgrad.dtype)
                torch.sign(scores.detach(), out=grad_out)  # then scaled in place: no sign(S) buffer
                update.expand_into(grad_out, None, update.coefficient(nodes, kept=kept, kernel_flag=kernel_flag).mul_(wgrad))
        return Measure(log_p, effective, nodes, lambda: ((counts > 0) & (wgrad != 0)).sum())


class KernelStep:
    """Channel-level R_P on the kernel-level state (``kernel_state``): the gradient of the
    kernel offsets O, G = c * dlogP/dW, replaces the per-weight sign(S) * G expansion."""

    def __init__(self, program: ChannelProgram, update: SurrogateUpdate) -> None:
        self.program, self.update = program, update

    def __call__(self, offset: torch.Tensor, kept: Kept, grad_out: torch.Tensor | None) -> Measure:
        import torch

        program, update = self.program, self.update
        with torch.no_grad():
            program.counts.zero_()
            program.counts.index_add_(0, kept.kernel, update.ones if kept.live is None else kept.live)
            log_p = program.forward_backward()
            wgrad, counts = program.grad, program.counts
            moving = wgrad[kept.kernel] != 0
            effective = moving if kept.live is None else moving & (kept.live > 0)
            nodes = update.node_flags(effective, kept)
            if grad_out is not None:
                kernel_flag = (moving & (counts[kept.kernel] > 0)).to(wgrad.dtype)
                torch.mul(update.coefficient(nodes, kept=kept, kernel_flag=kernel_flag), wgrad, out=grad_out)
        return Measure(log_p, effective, nodes, lambda: ((counts > 0) & (wgrad != 0)).sum())


class PixelStep:
    """Per-pixel R_P (``ref`` or ``exact``): weight-level gradient by autograd."""

    def __init__(self, objective: PixelObjective, update: SurrogateUpdate) -> None:
        self.objective, self.update = objective, update

    def __call__(self, scores: torch.Tensor, kept: Kept, grad_out: torch.Tensor | None) -> Measure:
        import torch

        self.objective.set_mask(kept.index)
        log_p, dmask = self.objective.log_paths(grad=True)
        assert dmask is not None
        with torch.no_grad():
            g = torch.sign(scores.detach()).to(dmask.dtype) * dmask
            effective = g[kept.index] != 0
            kernels, nodes = self.update.kernel_flags(effective, kept), self.update.node_flags(effective, kept)
            if grad_out is not None:
                self.update.weight_grad_into(grad_out, g, kernels, nodes)
        return Measure(log_p, effective, nodes, kernels.sum)


class Adam:
    """torch's Adam (defaults: betas 0.9/0.999, eps 1e-8, no weight decay) on one flat tensor.

    Calls the fused kernel that ``torch.optim.Adam(fused=True)`` runs, without the optimizer's
    per-step bookkeeping; falls back to ``torch.optim.Adam`` where no fused kernel exists.
    """

    def __init__(self, param: torch.Tensor, lr: float) -> None:
        import torch

        self.param, self.lr = param, float(lr)
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
        self.count = torch.zeros((), dtype=torch.float32, device=param.device)
        self.fallback: Any = None
        if not hasattr(torch, "_fused_adam_") or param.device.type not in ("cpu", "cuda"):
            self.fallback = torch.optim.Adam([param], lr=lr)

    def step(self) -> None:
        import torch

        if self.fallback is not None:
            self.fallback.step()
            return
        self.count += 1
        torch._fused_adam_(  # type: ignore[attr-defined]
            [self.param], [self.param.grad], [self.exp_avg], [self.exp_avg_sq], [], [self.count],
            amsgrad=False, lr=self.lr, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, maximize=False,
        )


@dataclass
class LoopResult:
    kept: Any  # the final selection, as ``prepare`` made it
    seconds: float
    initial: dict[str, float | int]
    final: dict[str, float | int]
    final_node_flags: np.ndarray
    trajectory: list[dict[str, float | int]] = field(default_factory=list)
    topk: dict[str, Any] = field(default_factory=dict)


def optimise(
    scores: torch.Tensor,
    step_fn: Callable[[torch.Tensor, Kept, torch.Tensor | None], Measure],
    topk: IncrementalTopK,
    update: SurrogateUpdate,
    *,
    steps: int,
    lr: float,
    record_every: int = 100,
    progress: Callable[[int, dict[str, Any] | None], None] | None = None,
    progress_every: int = 25,
    prepare: Callable[[torch.Tensor], Any] | None = None,
    view: Any = None,
) -> LoopResult:
    """Run ``steps`` DPaI updates on the ``scores`` leaf (in place).

    ``prepare`` turns the top-k's picks into what ``step_fn`` takes (default ``update.kept``);
    ``view`` is what the top-k reads (default ``scores``; the kernel state's ``KernelScores``
    when ``scores`` is its offset leaf).
    """
    import torch

    prepare = prepare or update.kept
    view = scores if view is None else view
    opt = Adam(scores, lr)
    scores.grad = torch.zeros_like(scores)
    trajectory: list[dict[str, Any]] = []
    initial: dict[str, Any] = {}
    start = time.perf_counter()
    for t in range(steps):
        kept = prepare(topk.select(view))
        measure = step_fn(scores, kept, scores.grad)
        if t % record_every == 0 or (progress is not None and t % progress_every == 0):
            stats = {"step": t, **measure.read()}
            if t % record_every == 0:
                trajectory.append(stats)
                if t == 0:
                    initial = dict(stats)
            if progress is not None:
                progress(t, stats)
        opt.step()
        if isinstance(view, ScoreSource):
            view.stepped()
        topk.moved(lr * adam_step_bound(t + 1) * (1 + 1e-3) + 1e-6)
    kept = prepare(topk.select(view))
    measure = step_fn(scores, kept, None)
    seconds = time.perf_counter() - start
    final = {"step": steps, **measure.read()}
    if not initial:
        initial = dict(final)
    if not trajectory or trajectory[-1]["step"] != steps:
        trajectory.append(final)
    if progress is not None:
        progress(steps, final)
    scores.grad = None
    return LoopResult(
        kept=kept,
        seconds=seconds,
        initial=initial,
        final=final,
        final_node_flags=measure.nodes.cpu().numpy() > 0,
        trajectory=trajectory,
        topk={"rebuilds": topk.rebuilds, "verifications": topk.verifications, "ties": topk.tie_events, "tie_rule": topk.ties, "pool_size": topk.pool_size},
    )
