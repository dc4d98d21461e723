"""SynFlow criterion: score = |theta ⊙ dR/dtheta|, R = 1ᵀ f_|theta|(1), pruned iteratively over E rounds.

As in Synaptic-Flow (``SynFlow`` + ``prune_loop``): every floating-point parameter of the model
(prunable weights, biases, norm scales/shifts *and* running statistics, constants) is replaced
by its absolute value, on a private clone, so signs never reach the user's graph (except an
additive attention mask: a constant holding ``-inf`` or a value at or below ``-1e30``, such
as ``finfo.min``, is data, not a parameter, and stays as it is so masked scores stay masked
rather than turning into ``+inf``); the network
runs in eval mode on one all-ones input (batch 1; other symbolic dims from
``am.context.extra["bind"]``, default 1); R is the sum of all outputs (its log and the kept count show on the progress bar). An embedding lookup is
an input too: its output is all ones (the interpreter's ``lookup="ones"``), so an integer
model input that only indexes lookups is accepted (fed ones, never read) and the table is never read. Each round e = 0..E-1
scores the live (masked) weights, pruned ones scoring 0, and keeps the top k_e by density
d_e = d^((e+1)/E) (``schedule=exp``) or 1 - (1 - d)(e+1)/E (``linear``), globally or per layer
(``scope``), with d = 1 - sparsity, or the kept fraction of an allocation pass's budget; the
last round keeps exactly the target count. Scores are divided by their
maximum each round (ranking-invariant) so they stay in range; float64 (the default) keeps R
finite on deep nets, float32 reproduces the released reference code, and a non-finite R is an
error rather than a silent random mask. All tensor work, top-k included, runs on ``--device``:
the round's weights, masks and scores are flat buffers reused in place (``synflow_net``), and on
the CPU the top-k is an exact sort-free selection (``synflow_select``) with the same ties.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np

from pai_compiler.errors import UsageError
from pai_compiler.ir import Graph, Param
from pai_compiler.pass_infra import AnalysisManager, PassResult
from pai_compiler.passes.criteria.base import CriterionPass, allocation_patterns, apply_scores, resolve_keep
from pai_compiler.passes.criteria.snip import Precision, to_numpy_scores
from pai_compiler.passes.criteria.synflow_net import LinearisedNet
from pai_compiler.passes.criteria.synflow_select import topk_mask_into, topk_mask_torch
from pai_compiler.progress import metric_bar

if TYPE_CHECKING:
    import torch

__all__ = ["SynflowPass", "schedule_keep", "topk_mask_torch"]

Schedule = Literal["exp", "linear"]


def schedule_keep(numel: int, keep: int, density: float, round_index: int, rounds: int, schedule: Schedule) -> int:
    """Weights kept after round ``round_index`` (0-based) of ``rounds`` towards ``density``.

    Round e keeps numel - floor((1 - d_e) * numel); the last round keeps exactly ``keep``.
    """
    if round_index >= rounds - 1 or numel == 0:
        return keep
    frac = (round_index + 1) / rounds
    d_e = density**frac if schedule == "exp" else 1.0 - (1.0 - density) * frac
    return max(keep, min(numel, numel - math.floor((1.0 - d_e) * numel)))


@dataclass(frozen=True)
class SynflowPass(CriterionPass):
    """Iterative synaptic-flow pruning (data-free, avoids layer collapse)."""

    name: ClassVar[str] = "synflow"
    iterations: int = 100
    schedule: Schedule = "exp"
    precision: Precision = "float64"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise UsageError(f"synflow: iterations must be a positive integer, got {self.iterations!r}")
        if self.schedule not in ("exp", "linear"):
            raise UsageError(f"synflow: schedule must be exp or linear, got {self.schedule!r}")
        if self.precision not in ("float32", "float64"):
            raise UsageError(f"synflow: precision must be float32 or float64, got {self.precision!r}")

    def _iterate(self, graph: Graph, am: AnalysisManager, params: list[Param], keep: dict[str, int] | int, rounds: int) -> dict[str, torch.Tensor]:
        net = LinearisedNet(graph, am, params, self.precision)
        scratch = np.empty(net.masks.numel(), dtype=bool) if net.device.type == "cpu" else None  # the top-k's, reused
        with metric_bar(am.context.progress and rounds > 1, "[bold]synflow[/]", rounds, unit="rounds") as bar:
            for e in range(rounds):
                net.score_round()
                if bar is not None:
                    total = float(net.total)
                    bar(e + 1, f"log R {math.log(total) if total > 0 else -math.inf:.2f} · kept {net.kept():,}")
                if e == rounds - 1:
                    return net.views(net.scores)
                self._prune_round(net, params, keep, e, rounds, scratch)
        raise AssertionError("unreachable: rounds >= 1")

    def _prune_round(self, net: LinearisedNet, params: list[Param], keep: dict[str, int] | int, e: int, rounds: int,
                     scratch: np.ndarray | None) -> None:
        """Round ``e``'s masks (in ``net.masks``): the top k_e of the scores, per layer or globally."""

        def density(numel: int, kept: int) -> float:
            # the target density itself when given (as the reference's schedule), else the budget's
            return 1.0 - float(self.sparsity) if self.sparsity is not None else kept / max(numel, 1)

        if isinstance(keep, dict):
            for p, (start, stop) in zip(params, net.spans):
                k = schedule_keep(p.numel, keep[p.name], density(p.numel, keep[p.name]), e, rounds, self.schedule)
                topk_mask_into(net.scores[start:stop], k, net.masks[start:stop], None if scratch is None else scratch[start:stop])
        else:
            numel = net.masks.numel()
            k = schedule_keep(numel, keep, density(numel, keep), e, rounds, self.schedule)
            topk_mask_into(net.scores, k, net.masks, scratch)

    def scores(self, graph: Graph, am: AnalysisManager, params: list[Param]) -> dict[str, np.ndarray]:
        """One round of SynFlow scores at the current masks (what ``iterations=1`` prunes by)."""
        return to_numpy_scores(self._iterate(graph, am, params, 0, 1))

    def run(self, graph: Graph, am: AnalysisManager) -> PassResult:
        params = graph.prunable_params()
        if not params:
            raise UsageError(f"{self.name}: the model has no prunable (conv/linear) weights")
        keep = resolve_keep(am, params, self.sparsity, self.scope, self.name)
        scores = self._iterate(graph, am, params, keep, self.iterations)
        apply_scores(graph, params, to_numpy_scores(scores), keep, allocation_patterns(am))  # the last round picks N of M
        return PassResult(modified=True, preserved=frozenset())
