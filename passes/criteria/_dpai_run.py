"""Set-up and report of one DPaI run: layout, seeded scores, the chosen R_P, per-pixel metrics.

Scores: one ``torch.Generator`` on the CPU seeded with ``seed`` draws N(0, 1) for each
prunable weight in graph order (in the weight's own shape), then the flat vector moves to the
device, so a seed gives the same initial mask everywhere. The report's ``initial``/``final``
blocks are measured per pixel in the reference convention (max-normalised float32 count,
model pooling) whatever ``paths`` drove the optimisation, plus the exact log count (float64,
sum pooling, no skip weighting).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pai_compiler.ir import Graph, OpKind, Param
from pai_compiler.passes.criteria._dpai_channel import ChannelProgram, conv_tap_live
from pai_compiler.passes.criteria._dpai_layout import Layout
from pai_compiler.passes.criteria._dpai_loop import ChannelStep, PixelStep, optimise
from pai_compiler.passes.criteria._dpai_pixel import PixelObjective, finite, input_bind, layer_counts, value_shapes
from pai_compiler.passes.criteria._dpai_topk import IncrementalTopK
from pai_compiler.passes.criteria._dpai_update import SurrogateUpdate

if TYPE_CHECKING:
    import torch

__all__ = ["initial_scores", "dead_taps", "reference_metrics", "run_dpai", "build", "tie_rule", "single_thread"]


def initial_scores(layout: Layout, seed: int, device: str | torch.device) -> torch.Tensor:
    """Flat N(0, 1) scores (oi order), drawn on the CPU from ``seed``, as a leaf on ``device``."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    parts = [torch.randn(layer.param.shape, generator=gen).permute(layer.perm).reshape(-1) for layer in layout.layers]
    return torch.cat(parts).to(device).requires_grad_(True)


def dead_taps(graph: Graph, params: list[Param], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Per conv weight: which taps ever read a real input pixel (only weights with dead taps)."""
    out: dict[str, np.ndarray] = {}
    for p in params:
        live = None
        for node in graph.param_users(p):
            if node.kind is OpKind.CONV and node.params.get("weight") is p:
                here = conv_tap_live(node, shapes[node.inputs[0].name], shapes[node.outputs[0].name])
                live = here if live is None else live | here
        if live is not None and not live.all():
            out[p.name] = live
    return out


def build(
    graph: Graph, params: list[Param], keep: Mapping[str, int], paths: str, alpha: float, beta: float, device: Any, bind: Mapping[str, int], ties: str = "auto"
) -> tuple[Layout, IncrementalTopK, SurrogateUpdate, Callable[..., Any]]:
    """Layout, top-k, surrogate and the step function for one R_P convention."""
    shapes = value_shapes(graph, bind, device) if paths == "channel" else {}
    layout = Layout(params, keep, dead_taps(graph, params, shapes) if paths == "channel" else None)
    topk = IncrementalTopK(layout, device, ties=tie_rule(paths, ties))
    update = SurrogateUpdate(layout, topk.order, alpha, beta, device)
    if paths == "channel":
        step: Callable[..., Any] = ChannelStep(ChannelProgram(graph, layout, shapes, device, bind), update)
    else:
        step = PixelStep(PixelObjective(graph, layout, paths, device, bind), update)  # type: ignore[arg-type]
    return layout, topk, update, step


def tie_rule(paths: str, ties: str) -> Any:
    """``auto``: the reference's sort for the per-pixel modes, lowest index for ``channel``."""
    return ties if ties != "auto" else ("index" if paths == "channel" else "sort")


def reference_metrics(graph: Graph, layout: Layout, update: SurrogateUpdate, keep_idx: np.ndarray, device: Any, bind: Mapping[str, int]) -> dict[str, Any]:
    """Per-pixel DPaI-convention log paths / nodes / kernels / params, plus the exact log count."""
    import torch

    ref = PixelStep(PixelObjective(graph, layout, "ref", device, bind), update)
    idx = torch.as_tensor(keep_idx, dtype=torch.int64, device=device)
    measure = ref(torch.ones(layout.numel, device=device), update.kept(idx), None)
    stats: dict[str, Any] = measure.read()
    exact = PixelObjective(graph, layout, "exact", device, bind)
    exact.set_mask(idx)
    stats["log_paths"] = finite(stats["log_paths"])
    stats["log_paths_exact"] = finite(exact.log_paths(grad=False)[0])
    stats["layer_nodes"] = layer_counts(layout, measure.nodes.cpu().numpy(), "node")
    return stats


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
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Optimise and return (report, masks by param name)."""
    with single_thread(device):
        return _run(graph, params, keep, options=options, seed=seed, device=device, bind=bind, progress=progress)


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


def _run(
    graph: Graph,
    params: list[Param],
    keep: Mapping[str, int],
    *,
    options: Any,
    seed: int,
    device: torch.device,
    bind: Mapping[str, int] | None,
    progress: Callable[[int, dict[str, Any] | None], None] | None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    import torch

    start = time.perf_counter()
    full_bind = input_bind(graph, bind)
    layout, topk, update, step = build(graph, params, keep, options.paths, options.alpha, options.beta, device, full_bind, options.ties)
    scores = initial_scores(layout, seed, device)
    initial_keep = topk.select(scores).cpu().numpy()
    setup = time.perf_counter() - start
    result = optimise(scores, step, topk, update, steps=options.steps, lr=options.lr, progress=progress)
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
        "convention": "dpai per-pixel: float32, model pooling, per-layer max-normalised (skip-weighted); log_paths_exact: float64 sum-pooled",
        "initial": reference_metrics(graph, layout, update, initial_keep, device, full_bind),
        "final": reference_metrics(graph, layout, update, result.keep_idx, device, full_bind),
        "objective": {"convention": objective[options.paths], "initial": result.initial, "final": result.final},
        "trajectory": result.trajectory,
        "topk": result.topk,
        "dead_taps": sorted(layout.tap_live),
    }
    return report, layout.masks(result.keep_idx)
