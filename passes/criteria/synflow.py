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
error rather than a silent random mask. All tensor work, top-k included, runs on ``--device``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from pai_compiler.errors import PaicError, UsageError
from pai_compiler.ir import Graph, Param
from pai_compiler.pass_infra import AnalysisManager, PassResult
from pai_compiler.passes.analysis.bindings import sample_bindings
from pai_compiler.passes.analysis.paths import ones_inputs
from pai_compiler.passes.criteria.base import CriterionPass, allocation_patterns, apply_scores, resolve_keep
from pai_compiler.passes.criteria.snip import Precision, to_numpy_scores, torch_device, torch_dtype
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


def topk_mask_torch(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Device twin of ``_base.topk_mask``: the k largest, ties to lower indices, NaN lowest."""
    import torch

    n = flat.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    flat = torch.nan_to_num(flat, nan=-math.inf)
    threshold = torch.kthvalue(flat, n - k + 1).values
    above = flat > threshold
    ties = flat == threshold
    need = k - above.sum()
    return above | (ties & (torch.cumsum(ties.to(torch.int64), 0) <= need))


def _kept(masks: dict[str, torch.Tensor]) -> int:
    """Weights the masks keep (one host sync)."""
    import torch

    return int(torch.stack([m.sum() for m in masks.values()]).sum()) if masks else 0


def _check_inputs(graph: Graph) -> None:
    """SynFlow feeds all-ones float inputs: an integer input is accepted as lookup indices, or as a
    mask that picks no embedding row (ones: attend everything), not as both."""
    from pai_compiler.interp import index_lookups, indexes_lookups_only  # imports torch

    for v in graph.inputs:
        if not v.dtype.startswith("float") and not indexes_lookups_only(v) and index_lookups(v):
            raise PaicError(f"synflow: input {v.name!r} is {v.dtype}; SynFlow feeds an all-ones float input "
                            "(an integer input is accepted only as the indices of embedding lookups, or as a mask)")


def _is_additive_mask(p: Param) -> bool:
    """A non-prunable constant with ``-inf`` or ``finfo.min``-like entries: an attention mask, not a parameter."""
    if p.prunable or p.numel == 0:
        return False
    data = np.asarray(p.data, dtype=np.float64)
    return bool(np.any(data <= _MASK_VALUE))


_MASK_VALUE = -1e30


class _LinearisedNet:
    """The abs-linearised clone, its Interpreter and the all-ones input, built once per run."""

    def __init__(self, graph: Graph, am: AnalysisManager, params: list[Param], precision: str) -> None:

        from pai_compiler.interp import Interpreter, is_float_array, param_tensor, torch_ready

        self.precision = precision
        self.dtype = torch_dtype(precision)
        self.device = device = torch_device(am, "synflow")
        net = graph.clone()
        for p in net.params():
            if is_float_array(p.data) and not _is_additive_mask(p):
                net.set_param_data(p, np.abs(torch_ready(p.data)))
        by_name = {p.name: p for p in net.params()}
        self.magnitudes = {p.name: param_tensor(by_name[p.name], self.dtype, device) for p in params}
        bind = sample_bindings(net, am.context.extra.get("bind"))
        self.interp = Interpreter(net, mode="real", dtype=self.dtype, device=device, bind=bind, lookup="ones")
        _check_inputs(net)
        # lookup="ones": every lookup outputs ones, so the (float) ones fed as its indices are never read
        self.ones = ones_inputs(net, bind, self.dtype, device)
        self.total: Any = 0.0  # R of the last round

    def scores(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """|theta ⊙ dR/dtheta| at ``masks`` (pruned weights 0), divided by the round's maximum."""
        import torch

        leaves = {n: (w * masks[n].to(self.dtype)).requires_grad_(True) for n, w in self.magnitudes.items()}
        self.interp.weights = leaves
        total = sum(o.sum() for o in self.interp.run(self.ones).outputs if o.is_floating_point())
        if not isinstance(total, torch.Tensor) or not total.requires_grad:
            return {n: torch.zeros_like(leaf) for n, leaf in leaves.items()}
        if not torch.isfinite(total):
            hint = "use synflow{precision=float64}" if self.precision == "float32" else "the network is too deep to score"
            raise PaicError(f"synflow: R = sum of outputs is {float(total)} in {self.precision}; {hint}")
        self.total = total.detach()
        total.backward()
        scores = {n: (leaf.grad * leaf.detach()).abs() if leaf.grad is not None else torch.zeros_like(leaf) for n, leaf in leaves.items()}
        top = torch.stack([s.max() for s in scores.values() if s.numel()]).max()
        top = torch.where(top > 0, top, torch.ones_like(top))  # no host sync on --device cuda
        return {n: s / top for n, s in scores.items()}


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
        import torch

        net = _LinearisedNet(graph, am, params, self.precision)
        masks = {p.name: torch.as_tensor(p.mask_or_ones(), device=net.device) for p in params}
        with metric_bar(am.context.progress and rounds > 1, "[bold]synflow[/]", rounds, unit="rounds") as bar:
            for e in range(rounds):
                scores = net.scores(masks)
                if bar is not None:
                    total = float(net.total)
                    bar(e + 1, f"log R {math.log(total) if total > 0 else -math.inf:.2f} · kept {_kept(masks):,}")
                if e == rounds - 1:
                    return scores
                self._prune_round(params, masks, scores, keep, e, rounds)
        raise AssertionError("unreachable: rounds >= 1")

    def _prune_round(self, params: list[Param], masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], keep: dict[str, int] | int, e: int, rounds: int) -> None:
        """Round ``e``'s masks: the top k_e of the scores, per layer or globally."""
        import torch

        sizes = [p.numel for p in params]

        def density(numel: int, kept: int) -> float:
            # the target density itself when given (as the reference's schedule), else the budget's
            return 1.0 - float(self.sparsity) if self.sparsity is not None else kept / max(numel, 1)

        if isinstance(keep, dict):
            for p in params:
                k = schedule_keep(p.numel, keep[p.name], density(p.numel, keep[p.name]), e, rounds, self.schedule)
                masks[p.name] = topk_mask_torch(scores[p.name].reshape(-1), k).reshape(p.shape)
        else:
            k = schedule_keep(sum(sizes), keep, density(sum(sizes), keep), e, rounds, self.schedule)
            flat = topk_mask_torch(torch.cat([scores[p.name].reshape(-1) for p in params]), k)
            for p, part in zip(params, torch.split(flat, sizes)):
                masks[p.name] = part.reshape(p.shape)

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
