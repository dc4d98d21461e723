"""Set-up and report of one DPaI run: layout, seeded scores, the state kept, the chosen R_P, the report.

Scores: one ``torch.Generator`` on the CPU seeded with ``seed`` draws N(0, 1) for each
prunable weight in graph order (in the weight's own shape), then the flat vector moves to the
device, so a seed gives the same initial mask everywhere. State: ``weights`` (every weight has a
score; ``build``), ``full`` (the same, but in channel mode |S0| per weight and Adam over kernels,
``kernel_state``, when kernels are at most ``KERNEL_SHARE_MAX`` of the weights) or ``band``
(channel R_P, index ties: only the weights near a top-k boundary, ``_dpai_band``); ``auto``
takes band when ``band_fraction`` <= ``BAND_MAX``, and full whenever the allocation patterned a
layer (N:M: per-group top-N every step, ``group_select``; a band is cut per layer, not per group). The loop state is freed before the report's ``initial``/``final`` blocks are measured per pixel in the reference
convention (max-normalised float32 count, model pooling) whatever ``paths`` drove the
optimisation, plus the exact log count (float64, sum pooling, no skip weighting); see
``_dpai_report``. Peak memory per prunable weight (``memory_estimate``, constants below): band
state ~5-6 B (the always-kept lists, the band's state, one layer's W and dlogP/dW at a time, the
report's activations), per-weight state ~52 B (S, Adam moments, S.grad: 16 B; kernel-level counts and
gradient; the kept-entry maps; the top-k pools and snapshot; per-step temporaries), kernel state
``KERNEL_WEIGHT_BYTES`` per weight (|S0|, the initial draw, one layer's temporaries) plus
``KERNEL_BYTES`` per kernel (O, its gradient and moments, counts, dlogP/dW, the snapshot).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pai_compiler.ir import Graph, Param
from pai_compiler.passes.allocation.pattern import NMPattern
from pai_compiler.memory import trim_heap
from pai_compiler.passes.analysis.bindings import sample_bindings
from pai_compiler.passes.criteria.dpai.band import BandState, band_fraction, drift_bound
from pai_compiler.passes.criteria.dpai.band_step import BandStep
from pai_compiler.passes.criteria.dpai.channel_program import ChannelProgram
from pai_compiler.passes.criteria.dpai.geometry import dead_taps
from pai_compiler.passes.criteria.dpai.layout import LayerInfo, Layout
from pai_compiler.passes.criteria.dpai.fixed_pool import FixedPoolTopK
from pai_compiler.passes.criteria.dpai.host_step import HostKernelStep, host_step_applies
from pai_compiler.passes.criteria.dpai.kernel_state import KernelScores
from pai_compiler.passes.criteria.dpai.loop import ChannelStep, KernelStep, PixelStep, optimise
from pai_compiler.passes.criteria.dpai.pixel_paths import PixelObjective, value_shapes
from pai_compiler.passes.criteria.dpai.report import MaskOf, reference_metrics
from pai_compiler.passes.criteria.dpai.select import IncrementalTopK
from pai_compiler.passes.criteria.dpai.step import SurrogateUpdate

if TYPE_CHECKING:
    import torch

__all__ = ["initial_scores", "dead_taps", "run_dpai", "build", "tie_rule", "single_thread", "choose_state", "memory_estimate", "BAND_MAX"]

#: ``auto`` keeps band state when the bands are expected to hold at most this share of the weights
BAND_MAX = 0.25
#: Peak CPU bytes per prunable weight beyond the loaded model and torch, measured (steps=10,
#: sparsity 0.9): full state 52 B (ViT-B/16); band state 6.2 B on ViT-B/16 (4.3 % of the weights
#: in bands; its token activations dominate) and 4.7 B on an 8192-wide MLP (4.5 %): ~4 B of
#: always-kept lists and masks plus ~40-60 B per band entry, and ~16 B per weight of the largest
#: layer (its W, dlogP/dW and flags exist one layer at a time).
FULL_BYTES, BAND_BYTES, BAND_TRACKED_BYTES, BAND_LAYER_BYTES = 56, 5, 60, 16
KERNEL_WEIGHT_BYTES, KERNEL_BYTES = 12, 48
#: channel R_P keeps the kernel state when kernels are at most this share of the weights (convs;
#: for linear layers a kernel is one weight and the kernel state only costs more memory)
KERNEL_SHARE_MAX = 0.5


def initial_scores(layout: Layout, seed: int, device: str | torch.device) -> torch.Tensor:
    """Flat N(0, 1) scores (oi order), drawn on the CPU from ``seed``, as a leaf on ``device``."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    flat = torch.empty(layout.numel)
    for layer in layout.layers:
        flat[layer.offset : layer.offset + layer.numel] = torch.randn(layer.param.shape, generator=gen).permute(layer.perm).reshape(-1)
    return flat.to(device).requires_grad_(True)


def build(
    graph: Graph, params: list[Param], keep: Mapping[str, int], paths: str, alpha: float, beta: float, device: Any, bind: Mapping[str, int], ties: str = "auto",
    patterns: Mapping[str, NMPattern] | None = None,
) -> tuple[Layout, IncrementalTopK, SurrogateUpdate, Callable[..., Any]]:
    """Layout, top-k (per group on the ``patterns`` layers), surrogate and the step function for one R_P convention."""
    shapes = value_shapes(graph, bind, device) if paths == "channel" else {}
    layout = Layout(params, keep, dead_taps(graph, params, shapes) if paths == "channel" else None)
    topk = IncrementalTopK(layout, device, ties=tie_rule(paths, ties), patterns=patterns)
    update = SurrogateUpdate(layout, topk.order, alpha, beta, device)
    if paths == "channel":
        step: Callable[..., Any] = ChannelStep(ChannelProgram(graph, layout, shapes, device, bind), update)
    else:
        step = PixelStep(PixelObjective(graph, layout, paths, device, bind), update)  # type: ignore[arg-type]
    return layout, topk, update, step


def tie_rule(paths: str, ties: str) -> Any:
    """``auto``: the reference's sort for the per-pixel modes, lowest index for ``channel``."""
    return ties if ties != "auto" else ("index" if paths == "channel" else "sort")


@contextlib.contextmanager
def single_thread(device: torch.device) -> Iterator[None]:
    """On the CPU the loop's tensors are small: one thread beats two, by far on a busy machine."""
    import torch

    before = torch.get_num_threads()
    if device.type == "cpu" and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def choose_state(state: str, paths: str, ties: str, sizes: Sequence[tuple[int, int]], steps: int, lr: float, patterned: bool = False) -> str:
    """``band`` or ``full`` (see the module docstring); ``sizes`` = (numel, keep) per layer;
    ``patterned``: some layer has an N:M pattern (band state cannot hold it: full)."""
    if state != "auto":
        return state
    if patterned or paths != "channel" or tie_rule(paths, ties) != "index":
        return "full"
    return "band" if band_fraction(sizes, steps, lr) <= BAND_MAX else "full"


def memory_estimate(params: Sequence[Param], keep: Mapping[str, int], options: Any, patterned: bool = False) -> tuple[int, str]:
    """(bytes, state): FULL_BYTES per weight (per-weight state), the kernel state's bytes, or (BAND_BYTES + BAND_TRACKED_BYTES x band share)
    per weight + BAND_LAYER_BYTES per weight of the largest layer."""
    sizes = [(p.numel, keep[p.name]) for p in params]
    weights = sum(n for n, _ in sizes)
    state = choose_state(getattr(options, "state", "auto"), options.paths, options.ties, sizes, options.steps, options.lr, patterned)
    kernels = sum(p.shape[p.out_axis] * (p.shape[p.in_axis] if p.in_axis is not None else 1) for p in params)
    if state == "full" and options.paths == "channel" and kernels <= KERNEL_SHARE_MAX * weights:
        return int(weights * KERNEL_WEIGHT_BYTES + kernels * KERNEL_BYTES), state
    if state in ("full", "weights"):
        return int(weights * FULL_BYTES), state
    per = BAND_BYTES + BAND_TRACKED_BYTES * band_fraction(sizes, options.steps, options.lr)
    return int(weights * per + BAND_LAYER_BYTES * max((n for n, _ in sizes), default=0)), state


def run_dpai(
    graph: Graph,
    params: list[Param],
    keep: Mapping[str, int],
    *,
    options: Any,
    seed: int,
    device: torch.device,
    bind: Mapping[str, int] | None = None,
    progress: Callable[[int, dict[str, Any] | None], None] | None = None,
    patterns: Mapping[str, NMPattern] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Optimise and return (report, masks by param name); on the CPU, call it inside :func:`single_thread`.
    ``patterns``: the allocation's N:M layers, binarised per group every step (full state)."""
    import torch

    start = time.perf_counter()
    full_bind = sample_bindings(graph, bind)
    patterns = patterns or {}
    sizes = [(p.numel, keep[p.name]) for p in params]
    state = choose_state(getattr(options, "state", "auto"), options.paths, options.ties, sizes, options.steps, options.lr, bool(patterns))
    assert not (patterns and state == "band"), "band state keeps no N:M groups (refused in DpaiPass.requires)"
    args = (graph, params, keep, options, seed, device, full_bind, progress, start)
    layout, result, initial, final, masks, tracked, setup = _band(*args) if state == "band" else _full(*args, per_weight=state == "weights", patterns=patterns)
    trim_heap()
    measured = {}
    for name, mask_of in (("initial", initial), ("final", final)):
        measured[name] = reference_metrics(graph, layout, mask_of, device, full_bind)
        trim_heap()
    objective = {"channel": "channel (interior value per channel, dpai normalisation)", "ref": "dpai per-pixel", "exact": "exact per-pixel (sum pooling)"}
    report: dict[str, Any] = {
        "paths": options.paths,
        "steps": options.steps,
        "seconds": result.seconds,
        "ms_per_step": 1000.0 * result.seconds / max(options.steps, 1),
        "setup_seconds": setup,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "seed": seed,
        "alpha": options.alpha,
        "beta": options.beta,
        "lr": options.lr,
        "kept": int(layout.total_keep),
        "state": state,
        "tracked": tracked,
        "convention": "dpai per-pixel: float32, model pooling, per-layer max-normalised (skip-weighted); log_paths_exact: float64 sum-pooled",
        "initial": measured["initial"],
        "final": measured["final"],
        "objective": {"convention": objective[options.paths], "initial": result.initial, "final": result.final},
        "trajectory": result.trajectory,
        "topk": result.topk,
        "dead_taps": sorted(layout.tap_live),
        "patterns": {name: str(p) for name, p in patterns.items()},
    }
    return report, masks()


def _full(
    graph: Graph, params: list[Param], keep: Mapping[str, int], options: Any, seed: int, device: Any, bind: Mapping[str, int], progress: Any, start: float,
    per_weight: bool = False, patterns: Mapping[str, NMPattern] | None = None,
) -> tuple[Any, ...]:
    """Every weight has a score (the state is freed on return, before the report); channel R_P
    keeps it at kernel level (``kernel_state``: |S0| per weight, Adam over kernels)."""
    layout, topk, update, step = build(graph, params, keep, options.paths, options.alpha, options.beta, device, bind, options.ties, patterns)
    scores = initial_scores(layout, seed, device)
    view: Any = scores
    if isinstance(step, ChannelStep) and not per_weight and layout.n_kernels <= KERNEL_SHARE_MAX * layout.numel:
        view = KernelScores(layout, scores, device)
        scores, step = view.offset, KernelStep(step.program, update)
        if host_step_applies(step.program, update):  # the CPU: numpy on the same buffers
            step = HostKernelStep(step.program, update)
        if topk.ties == "index":  # sync-free steps (host reads once per window)
            topk = FixedPoolTopK(layout, device, patterns=patterns)
    initial = topk.select(view)
    setup = time.perf_counter() - start
    prepare = step.kept if isinstance(step, HostKernelStep) else None
    result = optimise(scores, step, topk, update, steps=options.steps, lr=options.lr, progress=progress, view=view, prepare=prepare)
    if isinstance(view, KernelScores):
        result.topk["crossed_zero"] = view.crossed()
    final = result.kept.index
    result.kept = None
    return layout, result, _flat_mask_of(layout, initial), _flat_mask_of(layout, final), lambda: layout.masks(final.cpu().numpy()), layout.numel, setup


def _band(graph: Graph, params: list[Param], keep: Mapping[str, int], options: Any, seed: int, device: Any, bind: Mapping[str, int], progress: Any, start: float) -> tuple[Any, ...]:
    """Only the band entries have a score (``_dpai_band``); channel R_P, index ties."""
    shapes = value_shapes(graph, bind, device)
    layout = Layout(params, keep, dead_taps(graph, params, shapes))
    state = BandState(layout, seed, drift_bound(options.steps, options.lr), device)
    topk = IncrementalTopK(state, device, ties="index")  # type: ignore[arg-type]
    step = BandStep(state, layout, options.alpha, options.beta, device)
    step.program = ChannelProgram(graph, layout, shapes, device, bind, sources=step.source)
    initial = state.flags(topk.select(state.scores))
    setup = time.perf_counter() - start
    trim_heap()
    result = optimise(state.scores, step, topk, None, steps=options.steps, lr=options.lr, progress=progress, prepare=state.flags)  # type: ignore[arg-type]
    final, result.kept = result.kept, None
    state.scores = None  # type: ignore[assignment]

    def mask_of(flags: Any) -> MaskOf:
        return lambda layer: state.layer_mask(layer.index, flags)

    return layout, result, mask_of(initial), mask_of(final), lambda: state.masks(final), state.numel, setup


def _flat_mask_of(layout: Layout, keep_idx: Any) -> MaskOf:
    """Per-layer bool masks from flat kept indices (one flat bool vector, made on first use)."""
    import torch

    cache: list[Any] = []

    def mask_of(layer: LayerInfo) -> Any:
        if not cache:
            flat = torch.zeros(layout.numel, dtype=torch.bool, device=keep_idx.device)
            flat[keep_idx] = True
            cache.append(flat)
        return cache[0][layer.offset : layer.offset + layer.numel]

    return mask_of
