"""DPaI: differentiable pruning at initialisation by path/node/kernel balance (ICLR 2025 code).

Scores S ~ N(0, 1) per prunable weight; mask M_l = per-layer top-k of |S_l| at the
allocation's keep counts (ERK; boundary ties see ``ties`` below); plain STE through |S|.
With g = dlogP/dM * sign(S), R_P = log P the all-ones path count through the binary masks,
and flags E (effective weight), kernel[o, i], node[o] (algorithms.md §1.6):

    S.grad = -[(1-alpha) g + alpha((1-beta) g (1-node[o]) + beta g (1-kernel[o, i]))]

then one Adam step (lr constant, torch defaults); T steps, then the final top-k is the mask.
Boundary ties (frequent: boundary scores move in lockstep) follow ``ties``: ``sort`` is the
reference's unstable CPU sort (exact replay, a full sort per tie), ``index`` keeps the lower
flat index; ``auto`` = sort for ``ref``/``exact``, index for ``channel``. On the CPU the loop
runs single-threaded (its tensors are small; two threads are slower, much slower when busy).

``paths`` picks R_P: ``channel`` (default, fast: each feature map one value per channel, a conv
acts through W[o, i] = kept taps of kernel (o, i), kernel-level gradient expanded to taps;
see ``_dpai_channel``), ``ref`` (per pixel, the reference's float32 max-normalised count,
skip-weighted on ResNets) or ``exact`` (per pixel, float64 log-space true count, sum pooling).
Any IR graph works: chains, residual adds, concat, grouped/depthwise conv, pooling, and
attention, whose Q/K/V/out weights get real path gradients through the interpreter's gate
rule paths(A@B) = paths(A)@1 + 1@paths(B). The report (a ``DpaiReport``, in the pass record) always gives
the final mask's per-pixel reference-convention log paths, nodes, kernels and effective params,
and the ``node-path`` analysis of it (exact log paths, boolean effectiveness).

``state`` picks what is stored per weight: ``weights`` keeps S, the Adam moments and S.grad for
every weight (plus kernel-level buffers); ``band`` (channel mode, index ties; the same masks as
``weights`` bit for bit) only for the entries whose |S0| lies within 2D of their layer's top-k
boundary, D = sum_t lr * adam_step_bound(t) bounding any score's total movement: the others are
kept or dropped at every step (``_dpai_band``). ``full`` is ``weights`` for the per-pixel modes;
in channel mode, where kernels are at most half the weights (convolutions), it keeps |S0| per
weight and one Adam over kernels (``kernel_state``: every tap
of a kernel moves by the same step, so |S_e| = |S0_e| + O_k; the same dynamics, rounded once
instead of every step). ``auto`` takes ``band`` when the bands are
expected to hold at most a quarter of the weights (tens of steps at lr 0.005), else ``full``. An up-front
check refuses a run whose measured-per-weight estimate (``_dpai_run.memory_estimate``) exceeds
MemAvailable.

N:M patterns (``erk{pattern=2:4},dpai``): a layer the allocation patterned is binarised, every step
and at the end, by the N largest |S| of every M consecutive inputs (same out channel and tap),
ties to the lower input, through the allocation's own rule (``pattern.group_ranks``, also behind
``nm_mask``; ``group_select.GroupTopN``), so the optimisation sees exactly the masks it emits;
other layers keep their top-k. ``ties`` applies to those only (groups always use the pattern's
rule). ``state=band`` cannot hold a pattern: its bands are the entries near a layer-wide cut,
and a group's cut is its own N-th largest, which entries far from the layer's cut can cross, so
patterned runs take full state (``auto`` picks it; ``band`` is refused). dpai's own ``sparsity``
is refused with a pattern (the allocation's counts rule).

``latency`` (0 to 1, default 0) is the latency knob: the run uses alpha (1 - latency). DPaI's
node and kernel terms (weight alpha) revive dead channels and spread each layer's budget over
kernels, so at high sparsity its masks keep nearly every channel and ``paic compact`` removes
little; the path term (weight 1 - alpha) concentrates paths on few channels and leaves whole
channels dead. The knob trades effective nodes for dead channels (fewer MACs after compaction),
layer budgets unchanged. Measured on the CIFAR ResNet-20 at 99 %, seeds 0-2 (docs/dpai_latency.md):
effective nodes 271-291 at 0, 145-189 at any latency >= 0.25; the compact model (align 4) runs
2.1-2.2x dense onnxruntime at 0 and 3.0-3.65x at 0.25-1 (batch 1, 1 thread); beyond 0.25 the
seeds scatter more than the knob moves anything. The cost: at 0.5, 55.5 % test accuracy against
58.6 % at 0 (8-epoch CIFAR-10 schedule, seeds 0-1).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pai_compiler.errors import PaicError, UsageError
from pai_compiler.ir import Graph, OpKind, Param
from pai_compiler.pass_infra import AnalysisManager, PassResult, TransformPass
from pai_compiler.progress import metric_bar
from pai_compiler.passes.allocation.base import Allocation, check_sparsity, keep_count
from pai_compiler.passes.allocation.erk import erk_densities
from pai_compiler.passes.criteria.base import allocation_patterns, require_layer_counts, resolve_keep
from pai_compiler.passes.criteria.dpai.outcome import DpaiReport

__all__ = ["DpaiPass", "PathMode", "TieMode", "StateMode"]

PathMode = Literal["channel", "ref", "exact"]
TieMode = Literal["auto", "sort", "index"]
StateMode = Literal["auto", "full", "band", "weights"]


@dataclass(frozen=True)
class DpaiPass(TransformPass):
    """Optimise per-layer masks for paths, nodes and kernels (needs an allocation or ``sparsity``);
    an allocation's N:M pattern is held on its layers every step.

    ``state``: auto, full, band or weights (what is stored per weight); ``latency``: 0 (as published)
    to 1, the run's alpha is alpha (1 - latency): fewer live channels, more for ``paic compact`` to remove.
    """

    name: ClassVar[str] = "dpai"
    alpha: float = 0.99
    beta: float = 0.5
    lr: float = 0.005
    steps: int = 3000
    seed: int | None = None
    paths: PathMode = "channel"
    device: str | None = None
    sparsity: float | None = None
    ties: TieMode = "auto"
    state: StateMode = "auto"
    latency: float = 0.0

    def __post_init__(self) -> None:
        if self.paths not in ("channel", "ref", "exact"):
            raise UsageError(f"dpai: paths must be channel, ref or exact, got {self.paths!r}")
        if self.ties not in ("auto", "sort", "index"):
            raise UsageError(f"dpai: ties must be auto, sort or index, got {self.ties!r}")
        if self.state not in ("auto", "full", "band", "weights"):
            raise UsageError(f"dpai: state must be auto, full, band or weights, got {self.state!r}")
        if self.state == "band" and (self.paths != "channel" or self.ties == "sort"):
            raise UsageError("dpai: state=band needs paths=channel and index ties (the sort tie rule reads whole layers)")
        if self.steps < 0:
            raise UsageError(f"dpai: steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise UsageError(f"dpai: lr must be > 0, got {self.lr}")
        for label, value in (("alpha", self.alpha), ("beta", self.beta)):
            if not 0.0 <= value <= 1.0:
                raise UsageError(f"dpai: {label} must be in [0, 1], got {value}")
        if self.sparsity is not None:
            check_sparsity(self.sparsity, self.name)
        if not 0.0 <= self.latency <= 1.0:
            raise UsageError(f"dpai: latency must be in [0, 1] (0: as published, see docs/dpai_latency.md), got {self.latency}")

    @property
    def balance_alpha(self) -> float:
        """The alpha the run uses: alpha (1 - latency)."""
        return self.alpha * (1.0 - self.latency)

    def requires(self, graph: Graph, am: AnalysisManager) -> None:
        require_layer_counts(am, self.name, own_sparsity=self.sparsity is not None)
        patterns = allocation_patterns(am)
        if patterns and self.state == "band":
            raise UsageError(f"dpai: state=band keeps scores only near each layer's cut, not per N:M group; the pattern of "
                             f"'{am.provided(Allocation).source}' needs state=auto or full (auto picks full)")  # type: ignore[union-attr]

    def keep_counts(self, am: AnalysisManager, params: list[Param]) -> dict[str, int]:
        """ERK counts for ``sparsity``, else the allocation an earlier pass provided."""
        if self.sparsity is not None:
            densities = erk_densities(params, 1.0 - float(self.sparsity))
            return {p.name: keep_count(p.numel, 1.0 - densities[p.name]) for p in params}
        keep = resolve_keep(am, params, None, "layer", self.name)
        assert isinstance(keep, dict)
        return keep

    def run(self, graph: Graph, am: AnalysisManager) -> PassResult:
        import torch

        from pai_compiler.memory import trim_heap
        from pai_compiler.passes.criteria.dpai.driver import run_dpai, single_thread

        params = graph.prunable_params()
        if not params:
            raise UsageError("dpai: the model has no prunable (conv/linear) weights")
        keep = self.keep_counts(am, params)
        patterns = dict(allocation_patterns(am)) if self.sparsity is None else {}
        device = torch.device(self.device or am.context.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("dpai: device cuda requested but torch sees no CUDA device")
        _check_memory(params, keep, self, device.type, bool(patterns))
        seed = am.context.seed if self.seed is None else self.seed
        options = dataclasses.replace(self, alpha=self.balance_alpha) if self.latency else self
        if self.paths == "channel" and self.state != "band" and any(n.kind is OpKind.CONV_TRANSPOSE for n in graph.nodes):
            # a transposed conv's taps land on a stride-dependent subset of the output pixels: one value per
            # channel cannot represent it, so the per-pixel count (the reference's) runs instead
            am.warn("dpai: the model has transposed convs, which the channel-level path count cannot represent; "
                    "running dpai{paths=ref} (per pixel, slower)")
            options = dataclasses.replace(options, paths="ref")
        with _progress_bar(am.context.progress, self.steps, options.paths) as progress, single_thread(device):
            report, masks = run_dpai(
                graph, params, keep, options=options, seed=seed, device=device,
                bind=am.context.extra.get("bind"), progress=progress, patterns=patterns,
            )
        for p in params:
            graph.set_mask(p, masks.pop(p.name))
        del masks
        report["final"]["node_path"] = _node_path(graph, am)
        trim_heap()
        return PassResult(modified=True, preserved=frozenset(), report=DpaiReport(**report))


def _node_path(graph: Graph, am: AnalysisManager) -> dict[str, Any]:
    """The final mask through the ``node-path`` analysis: exact counts, boolean effectiveness."""
    from pai_compiler.passes.analysis.node_path import NodePathPass

    res = NodePathPass().run(graph, am)
    totals = {f: sum(getattr(row, f) for row in res.layers) for f in ("effective_nodes", "effective_kernels", "effective_params", "npb_nodes")}
    return {"log_paths": res.log_paths, "log_paths_dpai": res.log_paths_dpai, **totals}


@contextlib.contextmanager
def _progress_bar(enabled: bool, steps: int, mode: str) -> Iterator[Callable[[int, dict[str, Any] | None], None] | None]:
    """The run's bar on stderr (terminals only): steps/s, live log paths, effective nodes and kernels."""
    with metric_bar(enabled, f"[bold]dpai[/] ({mode})", steps) as bar:
        if bar is None:
            yield None
            return

        def update(step: int, stats: dict[str, Any] | None) -> None:
            bar(step, "" if stats is None else f"log P {stats['log_paths']:.2f} · nodes {stats['nodes']} · kernels {stats['kernels']}")

        yield update


def _check_memory(params: list[Param], keep: dict[str, int], options: DpaiPass, device: str, patterned: bool) -> None:
    """Refuse early, with a clear message, instead of being OOM-killed (CPU only)."""
    from pai_compiler.passes.criteria.dpai.driver import memory_estimate

    if device != "cpu":
        return
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh if ":" in line}
    except OSError:
        return
    available = info.get("MemAvailable")
    weights = sum(p.numel for p in params)
    need, state = memory_estimate(params, keep, options, patterned)
    if available is not None and need > available:
        raise PaicError(
            f"dpai: {weights:,} prunable weights need about {need / 2**30:.1f} GiB on the CPU ({state} state, {options.steps} steps), "
            f"only {available / 2**30:.1f} GiB is available; use fewer steps, --device cuda, exclude layers, or a one-shot method (magnitude, snip)"
        )
