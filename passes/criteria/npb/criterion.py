"""NPB: node-path balancing masks from one integer program per layer (NeurIPS 2023 code).

Layers are decided in graph order. For each, P_in[c] = exact path mass entering input channel
c through the masks decided so far (ones-forward, float64, sum pooling, no bias; summed over
pixels), then the integer program of ``_npb_milp`` (HiGHS via ``scipy.optimize.milp``) chooses
how many taps every kernel keeps:

    maximise alpha*A(nodes with >= min_n connections) + (1-alpha)*B(sum P_in M / max_path)
             + beta*Reg(non-empty kernels),   sum M <= n,  0 <= M <= max_p

and the taps of each kernel are placed at random (seeded) positions. As in the reference:
a conv with C_out*C_in > ``chunk_above`` (2048 = 64x32, the reference's ResNet-20 rule;
128x128 elsewhere) is solved in blocks of ``chunk`` output channels, each with budget
ceil(rho*block size); shortcut convs use max_p = 1 and beta = 0.001; after each shortcut and
each max-pool max_p drops by 2 while above 5; max_p is raised to ceil(n / #kernels) when the
budget needs it. Linear layers use max_p = 1 and beta = 0 as in the reference, but each is one
program over the whole layer, solved exactly by ``_npb_linear`` (the reference's independent
10-row blocks all get the same solution on an MLP; see there). Finally ``fine_tune_mask``
(``_npb_finetune``) turns ineffective weights into effective ones (conv layers as in the
reference; linear layers, which the reference skips, at random on-path positions). A 1x1 conv (one
group) solved in blocks takes ``_npb_linear`` per block too: with one tap per kernel its program
is a linear layer's (beta's Reg then adds beta/n per kept weight, the same for every weight), so
the closed form reaches the integer program's optimum; HiGHS took 1-14 s per block on MobileNetV2's
pointwise convs (minutes per model), the closed form milliseconds. Unchunked 1x1 convs (ResNet-20's
shortcuts) stay with HiGHS, whose pick among equal optima the recorded runs reproduce. Budgets follow the
allocation (ERK) up to those documented deviations (ResNet-20 at 99 %: 2767 kept instead of
2718 in the reference).

An N:M pattern from the allocation (``erk{sparsity=0.5,pattern=2:4},npb``) keeps N of every M
consecutive input channels at each tap: the programs gain one equality per group of M kernels
(N x taps kept taps; max_p raised to ceil(N taps / M) where it is lower), linear layers and 1x1
blocks take the closed form's per-group version, each group's taps are dealt to the kernel
positions so every tap gets exactly N, and the fix-up leaves patterned layers alone (moving a
weight would break its group).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from pai_compiler.errors import ModelError, PaicError, UsageError
from pai_compiler.ir import Graph, Node, OpKind, Param
from pai_compiler.pass_infra import AnalysisManager, PassResult, TransformPass
from pai_compiler.passes.allocation.base import check_sparsity, keep_count
from pai_compiler.passes.allocation.erk import erk_densities
from pai_compiler.passes.analysis.bindings import sample_bindings
from pai_compiler.passes.analysis.layer_paths import is_shortcut
from pai_compiler.passes.allocation.pattern import NMPattern
from pai_compiler.passes.criteria.base import allocation_patterns, require_layer_counts, resolve_keep
from pai_compiler.passes.criteria.npb.finetune import PathCounter, fine_tune
from pai_compiler.passes.criteria.npb.linear import solve_linear
from pai_compiler.passes.criteria.npb.milp import BlockProblem, ceil_budget, solve_block
from pai_compiler.progress import metric_bar

__all__ = ["NpbPass", "NpbReport"]

SHORTCUT_BETA = 0.001


@dataclass(frozen=True)
class NpbReport:
    """The ``PassResult.report`` of ``npb``: timings, kept vs allocated weights, one row per layer."""

    seconds: float
    milp_seconds: float
    solve_seconds: float
    seed: int
    kept: int
    allocated: int
    layers: list[dict[str, Any]]
    finetune: dict[str, Any] | None


def _warn_dropped(am: AnalysisManager, kept: int, allocated: int) -> None:
    """The fix-up drops weights that carry no path (the reference's rule): below 99 % of the budget, say so."""
    if kept < 0.99 * allocated:
        am.warn(f"npb kept {kept:,} of the {allocated:,} allocated weights ({100 * kept / allocated:.1f}%): its fix-up drops "
                "weights that lie on no input->output path, as the reference does; ask for a lower --sparsity to keep more")


def _refuse_transposed(graph: Graph) -> None:
    """NPB's per-layer programs are written for conv (out, in/groups, k) and linear layers only."""
    for node in graph.weighted_nodes():
        if node.kind is OpKind.CONV_TRANSPOSE:
            raise ModelError(f"npb: node {node.name!r} (conv_transpose): NPB has no program for transposed convs; "
                             "prune with synflow, snip, grasp, magnitude or dpai{paths=ref}")


@dataclass(frozen=True)
class NpbPass(TransformPass):
    """Per-layer integer programs balancing effective nodes and paths (needs an allocation or ``sparsity``)."""

    name: ClassVar[str] = "npb"
    alpha: float = 0.01
    beta: float = 1.0
    max_p: int = 9
    min_n: int = 1
    chunk: int = 32
    chunk_above: int = 2048
    seed: int | None = None
    finetune: bool = True
    time_limit: float = 60.0
    sparsity: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"npb: alpha must be in [0, 1], got {self.alpha}")
        if self.beta < 0 or self.max_p < 1 or self.min_n < 0 or self.chunk < 1 or self.time_limit <= 0:
            raise UsageError("npb: beta >= 0, max_p >= 1, min_n >= 0, chunk >= 1 and time_limit > 0 are required")
        if self.sparsity is not None:
            check_sparsity(self.sparsity, self.name)

    def requires(self, graph: Graph, am: AnalysisManager) -> None:
        require_layer_counts(am, self.name, own_sparsity=self.sparsity is not None)

    def run(self, graph: Graph, am: AnalysisManager) -> PassResult:
        params = graph.prunable_params()
        if not params:
            raise UsageError("npb: the model has no prunable (conv/linear) weights")
        _refuse_transposed(graph)
        if self.sparsity is not None:
            dens = erk_densities(params, 1.0 - float(self.sparsity))
            keep = {p.name: keep_count(p.numel, 1.0 - dens[p.name]) for p in params}
        else:
            resolved = resolve_keep(am, params, None, "layer", self.name)
            assert isinstance(resolved, dict)
            keep = resolved
        patterns = dict(allocation_patterns(am)) if self.sparsity is None else {}
        seed = am.context.seed if self.seed is None else self.seed
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        counter = PathCounter(graph, params, sample_bindings(graph, am.context.extra.get("bind")))
        masks = {p.name: np.zeros(p.shape, dtype=bool) for p in params}
        first_user = {p.name: graph.param_users(p)[0] for p in params}
        order: dict[int, list[Param]] = {}
        for p in params:
            order.setdefault(id(first_user[p.name]), []).append(p)
        rows: list[dict[str, Any]] = []
        shortcuts: dict[str, bool] = {}
        max_p = self.max_p
        steps = len(params) + int(self.finetune)
        with metric_bar(am.context.progress, "[bold]npb[/]", steps, unit="layers") as bar:
            for node in graph.nodes:
                if node.kind is OpKind.POOL and node.attrs.get("mode") == "max" and not node.attrs.get("reduce") and max_p > 5:
                    max_p -= 2
                for p in order.get(id(node), []):
                    shortcut = node.kind is OpKind.CONV and is_shortcut(node, p)
                    shortcuts[p.name] = shortcut
                    rows.append(self._layer(counter, masks, node, p, keep[p.name], max_p, shortcut, rng, patterns.get(p.name)))
                    if shortcut and max_p > 5:
                        max_p -= 2
                    if bar is not None:
                        bar(len(rows), _layer_metrics(rows))
            milp_seconds = time.perf_counter() - start
            conv = {p.name: first_user[p.name].kind is OpKind.CONV for p in params}
            if bar is not None and self.finetune:
                bar(len(rows), f"fine-tuning · kept {sum(r['kept'] for r in rows):,}")
            tuned = fine_tune(counter, masks, shortcuts, conv, rng, fixed=set(patterns)) if self.finetune else None
            if bar is not None:
                bar(steps, f"kept {int(sum(np.count_nonzero(m) for m in masks.values())):,} of {sum(keep.values()):,} allocated")
        seconds = time.perf_counter() - start
        for p in params:
            graph.set_mask(p, masks[p.name])
        kept, allocated = int(sum(np.count_nonzero(m) for m in masks.values())), int(sum(keep.values()))
        _warn_dropped(am, kept, allocated)
        report = NpbReport(
            seconds=seconds,
            milp_seconds=milp_seconds,
            solve_seconds=sum(r["solve_seconds"] for r in rows),
            seed=seed,
            kept=kept,
            allocated=allocated,
            layers=rows,
            finetune=tuned,
        )
        return PassResult(modified=True, preserved=frozenset(), report=report)

    def _layer(self, counter: PathCounter, masks: dict[str, np.ndarray], node: Node, p: Param, keep: int, max_p: int, shortcut: bool,
               rng: np.random.Generator, pattern: NMPattern | None = None) -> dict[str, Any]:
        """Decide one layer's mask (in ``masks``); returns its report row."""
        oi = p.to_oi(np.zeros(p.shape, dtype=bool)).shape
        conv = node.kind is OpKind.CONV
        p_in = counter.input_mass(masks, node, 1 if conv else -1, p)
        nm = None if pattern is None else (pattern.n, pattern.m)
        if not conv:  # the whole layer's program, solved exactly (``_npb_linear``)
            start = time.perf_counter()
            mask = solve_linear(p_in, oi[0], keep, self.alpha, self.min_n, rng, nm)
            masks[p.name] = p.from_oi(mask.reshape(oi)).copy()
            return {"layer": p.name, "allocated": int(keep), "kept": int(mask.sum()), "blocks": 1, "max_p": 1,
                    "shortcut": False, "solve_seconds": time.perf_counter() - start, "status": "exact"}
        out_ch, per_group = oi[0], oi[1]
        taps = math.prod(oi[2:])
        groups = int(node.attrs.get("groups", 1))
        kernels = out_ch * per_group
        kernel_out = np.repeat(np.arange(out_ch), per_group)
        kernel_in = (kernel_out // (out_ch // groups)) * per_group + np.tile(np.arange(per_group), out_ch)
        if not shortcut:
            cap, beta = min(max_p, taps), self.beta
        else:
            cap, beta = 1, SHORTCUT_BETA
        block = self.chunk if groups == 1 and kernels > self.chunk_above else out_ch
        density = keep / p.numel if nm is None else nm[0] / nm[1]
        if nm is not None:
            cap = max(cap, -(-nm[0] * taps // nm[1]))  # N taps x N per group must fit in M kernels
        counts = np.zeros(kernels, dtype=np.int64)
        seconds, statuses = 0.0, set()
        for lo in range(0, out_ch, block):
            hi = min(out_ch, lo + block)
            sel = slice(lo * per_group, hi * per_group)
            budget = keep if block == out_ch else ceil_budget(density, (hi - lo) * per_group * taps)
            used_in = np.unique(kernel_in[sel])
            prob = BlockProblem(
                kernel_in=np.searchsorted(used_in, kernel_in[sel]), kernel_out=kernel_out[sel] - lo, n_in=used_in.size, n_out=hi - lo,
                p_in=p_in[used_in], budget=budget, max_p=max(cap, math.ceil(budget / max((hi - lo) * per_group, 1))), alpha=self.alpha, beta=beta, min_n=self.min_n,
                group_of=None if nm is None else np.arange(sel.stop - sel.start) // nm[1], group_total=0 if nm is None else nm[0] * taps,
            )
            if taps == 1 and groups == 1 and kernels > self.chunk_above:  # a chunked 1x1 conv: each block is a linear layer's program
                start = time.perf_counter()
                counts[sel] = solve_linear(prob.p_in, prob.n_out, budget, self.alpha, self.min_n, rng, nm).reshape(-1)
                seconds += time.perf_counter() - start
                statuses.add("exact")
                continue
            sol = solve_block(prob, self.time_limit)
            counts[sel] = np.minimum(sol.counts, taps)
            seconds += sol.seconds
            statuses.add(sol.status)
        if nm is not None and not (counts.reshape(-1, nm[1]).sum(axis=1) == nm[0] * taps).all():
            raise PaicError(f"npb: layer {p.name!r}: the N:M program stopped before every group held {nm[0] * taps} taps "
                            f"(status {','.join(sorted(statuses))}); raise npb{{time_limit=...}}")
        mask_oi = (_random_taps(counts, taps, rng) if nm is None else _dealt_taps(counts, taps, nm[1], rng)).reshape(oi)
        masks[p.name] = p.from_oi(mask_oi).copy()
        return {
            "layer": p.name, "allocated": int(keep), "kept": int(counts.sum()), "blocks": -(-out_ch // block), "max_p": int(cap),
            "shortcut": shortcut, "solve_seconds": seconds, "status": ",".join(sorted(statuses)),
        }


def _random_taps(counts: np.ndarray, taps: int, rng: np.random.Generator) -> np.ndarray:
    """(kernels, taps) bool: each kernel keeps ``counts`` taps at random positions."""
    ranks = np.argsort(np.argsort(rng.random((counts.size, taps)), axis=1), axis=1)
    return ranks < counts[:, None]


def _dealt_taps(counts: np.ndarray, taps: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """(kernels, taps) bool for N:M groups of ``m`` kernels, each group's counts summing to N taps:
    its kept taps, kernel after kernel, are dealt round the tap positions in a seeded order, so
    every tap keeps exactly N of the group and a kernel's c <= taps taps are distinct."""
    groups = counts.size // m
    kernel = np.repeat(np.arange(counts.size), counts).reshape(groups, -1)  # every group holds N x taps
    order = np.argsort(rng.random((groups, taps)), axis=1)
    tap = np.take_along_axis(order, np.arange(kernel.shape[1])[None, :] % taps, axis=1) if kernel.size else kernel
    mask = np.zeros((counts.size, taps), dtype=bool)
    mask[kernel.reshape(-1), tap.reshape(-1)] = True
    return mask


def _layer_metrics(rows: list[dict[str, Any]]) -> str:
    """The bar's live text after a layer: that layer, its kept/allocated weights, and the total kept so far."""
    last = rows[-1]
    return f"{last['layer']} {last['kept']:,}/{last['allocated']:,} ({last['status']}) · kept {sum(r['kept'] for r in rows):,}"
