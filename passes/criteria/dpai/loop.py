"""The DPaI loop: masks = per-layer top-k of |S| -> path gradient -> surrogate -> Adam, T times.

Step t (t = 0..T-1) measures the mask of the current scores, writes
S.grad = -[(1-a) g + a((1-b) node_grad + b kernel_grad)] and takes one Adam step (torch
defaults, constant lr, the fused kernel where the device has one). A final measurement follows
the last step, as in the reference. Statistics are read back (one device sync) only every
``record_every`` steps for the trajectory and every ``progress_every`` for the progress bar.
``prepare`` turns the top-k's picks into what the step takes (``SurrogateUpdate.kept`` for the
full state, band flags for ``_dpai_band``); S.grad is dropped after the last step. On the
kernel state with index ties (the channel default for long runs) the top-k is a
``FixedPoolTopK`` and steps run in windows with no host read inside (``_windows``): the
records of a window are read back together at its end, with the flag saying whether every
selection was exact; a window that was not is replayed from its checkpoint.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pai_compiler.passes.criteria.dpai.channel_program import ChannelProgram
from pai_compiler.passes.criteria.dpai.fixed_pool import FixedPoolTopK
from pai_compiler.passes.criteria.dpai.kernel_state import KernelScores, ScoreSource
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

    def values(self) -> torch.Tensor:
        """[log paths, nodes, kernels, params] as float64 on the device (no host sync)."""
        import torch

        counts = (self.nodes.sum(), self.kernel_count(), self.effective.sum())
        log_p = self.log_paths.detach().float().to(device=counts[0].device, dtype=torch.float64).reshape(())
        return torch.stack([log_p, *(t.to(torch.float64) for t in counts)])

    def read(self) -> dict[str, float | int]:
        return stats_of(self.values().tolist())


def stats_of(values: list[float]) -> dict[str, float | int]:
    """The trajectory's entry from ``Measure.values``."""
    return {"log_paths": values[0], "nodes": int(values[1]), "kernels": int(values[2]), "params": int(values[3])}


#: kept entries per kernel below which the counts are cleared at the last step's kept kernels only
SPARSE_RESET = 1 / 16


class ChannelStep:
    """Channel-level R_P (the fast default): kernel-level gradient, expanded over taps.

    Per step: kept taps per kernel into ``program.counts`` (cleared where the last step wrote, on
    big sparse layouts), log P and dlogP/dW per kernel, the flags, G = c * dlogP/dW per kernel
    (into a buffer kept across steps: big models fault fresh pages in every step otherwise).
    """

    def __init__(self, program: ChannelProgram, update: SurrogateUpdate) -> None:
        self.program, self.update = program, update
        self._written: torch.Tensor | None = None  # kernels the last step's counts wrote
        self._kernel_grad: torch.Tensor | None = None

    def _counts_and_gradient(self, kept: Kept) -> Any:
        """Kept taps per kernel into ``program.counts``, then log P (dlogP/dW in ``program.grad``)."""
        counts = self.program.counts
        if self._written is None:
            counts.zero_()
        else:
            counts.index_fill_(0, self._written, 0.0)
        counts.index_add_(0, kept.kernel, self.update.ones if kept.live is None else kept.live)
        self._written = kept.kernel if kept.kernel.numel() < SPARSE_RESET * counts.numel() else None
        return self.program.forward_backward()

    def __call__(self, scores: torch.Tensor, kept: Kept, grad_out: torch.Tensor | None) -> Measure:
        import torch

        update = self.update
        with torch.no_grad():
            log_p = self._counts_and_gradient(kept)
            wgrad, counts = self.program.grad, self.program.counts
            at_kept = wgrad[kept.kernel]  # one gather, read again by the kernel gradient
            moving = at_kept != 0
            effective = moving if kept.live is None else moving & (kept.live > 0)
            nodes = update.node_flags(effective, kept)
            if grad_out is not None:
                # every kept kernel has counts >= 1 unless dead taps are weighted out (then read them)
                kernel_flag = (moving if kept.live is None else moving & (counts[kept.kernel] > 0)).to(wgrad.dtype)
                self.write_gradient(grad_out, scores, lambda out: update.kernel_gradient(nodes, kept, kernel_flag, wgrad, out, at_kept))
        return Measure(log_p, effective, nodes, lambda: self._kernel_count(kept, effective))

    def _kernel_count(self, kept: Kept, effective: torch.Tensor) -> torch.Tensor:
        """Kernels with kept live taps and a nonzero gradient: from the kept entries on sparse big
        layouts (a sort of the kept kernels, not three passes over every kernel)."""
        import torch

        counts, wgrad = self.program.counts, self.program.grad
        if self._written is None:
            return torch.count_nonzero((counts > 0) & (wgrad != 0))
        return torch.count_nonzero(torch.unique(kept.kernel[effective]) >= 0)

    def write_gradient(self, grad_out: torch.Tensor, scores: torch.Tensor, kernel_gradient: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Per weight: sign(S) * G of its kernel, expanded over the taps."""
        import torch

        if self._kernel_grad is None:
            self._kernel_grad = torch.empty_like(self.program.grad)
        torch.sign(scores.detach(), out=grad_out)  # then scaled in place: no sign(S) buffer
        self.update.expand_into(grad_out, None, kernel_gradient(self._kernel_grad))


class KernelStep(ChannelStep):
    """Channel-level R_P on the kernel-level state (``kernel_state``): the gradient of the
    kernel offsets O, G = c * dlogP/dW, replaces the per-weight sign(S) * G expansion."""

    def write_gradient(self, grad_out: torch.Tensor, scores: torch.Tensor, kernel_gradient: Callable[[torch.Tensor], torch.Tensor]) -> None:
        kernel_gradient(grad_out)


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
    ``host_free``: torch's capturable single-tensor formula instead, the step count and bias
    corrections on the device (the CPU fused kernel reads the count back every step).
    """

    def __init__(self, param: torch.Tensor, lr: float, host_free: bool = False) -> None:
        import torch

        self.param, self.lr, self.host_free = param, float(lr), host_free
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
        self.count = torch.zeros((), dtype=torch.float32, device=param.device)
        self.fallback: Any = None
        if not host_free and (not hasattr(torch, "_fused_adam_") or param.device.type not in ("cpu", "cuda")):
            self.fallback = torch.optim.Adam([param], lr=lr)

    def _host_free_step(self) -> None:
        """param -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps), all on the device."""
        import torch

        grad, count = self.param.grad, self.count
        count += 1
        self.exp_avg.lerp_(grad, 0.1)
        self.exp_avg_sq.mul_(0.999).addcmul_(grad, grad, value=0.001)
        step_neg = torch.pow(0.9, count).sub_(1).reciprocal_().mul_(self.lr)  # -lr / (1 - b1^t)
        correction2 = torch.pow(0.999, count).neg_().add_(1).sqrt_()
        denom = (self.exp_avg_sq.sqrt() / (correction2 * step_neg)).add_(1e-8 / step_neg)
        self.param.detach().addcdiv_(self.exp_avg, denom)

    def checkpoint(self) -> tuple[torch.Tensor, ...]:
        """Copies of the moments and the step count (the fused kernel only)."""
        return self.exp_avg.clone(), self.exp_avg_sq.clone(), self.count.clone()

    def restore(self, saved: tuple[torch.Tensor, ...]) -> None:
        for mine, copy in zip((self.exp_avg, self.exp_avg_sq, self.count), saved):
            mine.copy_(copy)

    def step(self) -> None:
        import torch

        if self.host_free:
            self._host_free_step()
            return
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
    window: int | None = None,
    host_free: bool | None = None,
) -> LoopResult:
    """Run ``steps`` DPaI updates on the ``scores`` leaf (in place).

    ``prepare`` turns the top-k's picks into what ``step_fn`` takes (default ``update.kept``);
    ``view`` is what the top-k reads (default ``scores``; the kernel state's ``KernelScores``
    when ``scores`` is its offset leaf). With a :class:`FixedPoolTopK` the steps run in windows
    of ``window`` (default ``progress_every``) steps without any host read; see :func:`_windows`.
    ``host_free`` picks Adam's host-free formula (default: windowed runs off the CPU; on the CPU
    the fused kernel's read of its step count is a memory load, not a device sync, and 20x cheaper).
    """
    import torch

    prepare = prepare or update.kept
    view = scores if view is None else view
    windowed = isinstance(topk, FixedPoolTopK) and isinstance(view, KernelScores)
    opt = Adam(scores, lr, host_free=windowed and scores.device.type != "cpu" if host_free is None else host_free)
    scores.grad = torch.zeros_like(scores)
    log = _Recorder(record_every, progress, progress_every)
    records = log.records

    def one_step(t: int, select: Callable[[Any], torch.Tensor]) -> None:
        measure = step_fn(scores, prepare(select(view)), scores.grad)
        if log.wants(t):
            records[t] = measure.values()
        opt.step()
        if isinstance(view, ScoreSource):
            view.stepped()
        topk.moved(lr * adam_step_bound(t + 1) * (1 + 1e-3) + 1e-6)

    start = time.perf_counter()
    if windowed:
        _windows(steps, window or progress_every, one_step, log.publish, topk, view, opt, records)
    else:
        for t in range(steps):
            one_step(t, topk.select)
            log.publish()
    return _finish(scores, step_fn, prepare(topk.select(view)), topk, log, steps, start, progress)


def _finish(scores: torch.Tensor, step_fn: Callable[[torch.Tensor, Kept, torch.Tensor | None], Measure], kept: Kept,
            topk: IncrementalTopK, log: _Recorder, steps: int, start: float,
            progress: Callable[[int, dict[str, Any] | None], None] | None) -> LoopResult:
    """Measure the final top-k ``kept`` once more and assemble the run's result."""
    trajectory = log.trajectory
    measure = step_fn(scores, kept, None)
    seconds = time.perf_counter() - start
    final = {"step": steps, **measure.read()}
    initial = dict(trajectory[0]) if trajectory and trajectory[0]["step"] == 0 else dict(final)
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
        topk=_topk_stats(topk),
    )


class _Recorder:
    """Which steps are recorded, and their read-back (one host read for all pending) into the
    trajectory (every ``record_every``) and the progress bar (every ``progress_every``)."""

    def __init__(self, record_every: int, progress: Callable[[int, dict[str, Any] | None], None] | None, progress_every: int) -> None:
        self.record_every, self.progress, self.progress_every = record_every, progress, progress_every
        self.records: dict[int, Any] = {}
        self.trajectory: list[dict[str, Any]] = []

    def wants(self, t: int) -> bool:
        return t % self.record_every == 0 or (self.progress is not None and t % self.progress_every == 0)

    def publish(self) -> None:
        import torch

        if not self.records:
            return
        rows = torch.stack(list(self.records.values())).tolist()
        for t, row in zip(list(self.records), rows):
            stats = {"step": t, **stats_of(row)}
            if t % self.record_every == 0:
                self.trajectory.append(stats)
            if self.progress is not None and t % self.progress_every == 0:
                self.progress(t, stats)
        self.records.clear()


def _windows(steps: int, window: int, one_step: Callable[..., None], publish: Callable[[], None], topk: FixedPoolTopK,
             view: KernelScores, opt: Adam, records: dict[int, Any]) -> None:
    """Steps in windows with no host read inside: one read per window says whether every
    selection was exact; a window that was not is replayed from its checkpoint with the checked
    top-k (host checks each step), and the pools are refilled when their room runs low."""
    t = 0
    topk.refill(view)
    while t < steps:
        end = min(steps, t + window)
        saved, moments = view.checkpoint(), opt.checkpoint()
        for u in range(t, end):
            one_step(u, topk.select)
        exact, start_room, room = topk.window_end()
        if not exact:
            view.restore(saved)
            opt.restore(moments)
            records.clear()
            topk.replays += 1
            topk.checked.t0 = None  # rebuilt from the restored scores on its first call
            for u in range(t, end):
                one_step(u, topk.checked.select)
        publish()
        # the room shrinks by the true drift: refill before the next window could use it up
        if not exact:
            topk.grow()
        if not exact or room < 2 * max(start_room - room, 0.0):
            topk.refill(view)
        t = end


def _topk_stats(topk: IncrementalTopK) -> dict[str, Any]:
    stats = {"rebuilds": topk.rebuilds, "verifications": topk.verifications, "ties": topk.tie_events, "tie_rule": topk.ties, "pool_size": topk.pool_size}
    if isinstance(topk, FixedPoolTopK):
        stats.update(sync_free=True, replays=topk.replays, checked_rebuilds=topk.checked.rebuilds)
    return stats
