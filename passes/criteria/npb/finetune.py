"""NPB's fix-up pass (``fine_tune_mask``, algorithms.md §2.1 item 6) and its path-mass helpers.

Exact path counts come from ``analysis.paths`` (``exact`` convention: float64, sum pooling, no
bias, log-space scaling). With P = number of input->output paths, dlogP/dM_e > 0 exactly when a
kept entry e lies on a path (it is *effective*). Conv layer by conv layer, in graph order:
drop the ineffective kept weights and re-spend their count plus the carry on whole kernels
(shortcuts: whole input columns), those with the most effective weights first; whatever is
still ineffective is dropped and its count carried to the next layer (see :func:`fine_tune`
for the reference's details we keep). Linear layers, which the reference leaves alone (its
linear branch only prints), get the same treatment with single weights as kernels: with a fresh
gradient, the ineffective weights plus the carry move to random (seeded) free positions that lie
on a path (dlogP/dM > 0: input reached, output read further on); what finds no place is carried.
On an MLP this is what keeps the first layer's weights alive when the next layer's path term
reads only the hidden units with the most paths (LeNet-300 at 98 %: 3348 of 3621 fc1 weights).
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pai_compiler.ir import Graph, Node, OpKind, Param
from pai_compiler.passes.analysis.paths import PathCount, count_paths, path_gradients

if TYPE_CHECKING:
    import torch

__all__ = ["PathCounter", "fine_tune"]


class PathCounter:
    """Exact float64 path forward/backward over the graph with masks given as numpy bools."""

    def __init__(self, graph: Graph, params: list[Param], bind: Mapping[str, int]) -> None:
        self.graph, self.params, self.bind = graph, params, dict(bind)

    def _count(self, masks: Mapping[str, np.ndarray], grad: bool) -> tuple[PathCount, dict[str, torch.Tensor]]:
        import torch  # heavy optional dependency: only the path counts need it

        leaves = {p.name: torch.as_tensor(masks[p.name], dtype=torch.float64).requires_grad_(grad) for p in self.params}
        with torch.set_grad_enabled(grad):
            count = count_paths(self.graph, "exact", self.bind, weights=leaves)
        return count, leaves

    def input_mass(self, masks: Mapping[str, np.ndarray], node: Node, channel_axis: int, param: Param | None = None) -> np.ndarray:
        """Relative path mass per channel of the input ``param`` reads in ``node`` (summed over every
        other axis): the node's input, except for a fused attention node's ``out_proj``, which reads
        the attention output (the run's ``inner_values``)."""
        import torch  # heavy optional dependency: only the path counts need it

        with torch.no_grad():
            run = self._count(masks, grad=False)[0].run
        x = run.values[node.inputs[0].name].detach()
        if node.kind is OpKind.ATTENTION and param is not None and param is node.params.get("out_proj_weight"):
            x = run.inner_values[f"{node.name}/out_proj_input"].detach()
        axis = channel_axis % x.dim()
        return x.sum(dim=[a for a in range(x.dim()) if a != axis]).numpy().astype(np.float64)

    def gradient(self, masks: Mapping[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        """(log P, dlogP/dM per param); an empty network gives zeros."""
        import torch  # heavy optional dependency: only the path counts need it

        count, leaves = self._count(masks, grad=True)
        log_p = count.log_paths
        if not torch.isfinite(log_p):
            return float(log_p.detach()), {name: np.zeros(t.shape) for name, t in leaves.items()}
        grads = path_gradients(log_p, list(leaves.values()))
        return float(log_p.detach()), {name: (np.zeros(t.shape) if g is None else g.numpy()) for (name, t), g in zip(leaves.items(), grads)}


def fine_tune(counter: PathCounter, masks: dict[str, np.ndarray], shortcut: Mapping[str, bool], conv: Mapping[str, bool], rng: np.random.Generator | None = None,
              fixed: Collection[str] = ()) -> dict[str, Any]:
    """Apply the fix-up in place on ``masks`` (natural shapes); returns per-layer statistics.

    As the reference for conv layers: effectiveness comes from one gradient taken before the
    pass; a layer is fixed when its ineffective weights plus the carry exceed one; whole kernels
    (shortcuts: whole input columns) are switched on in order of their effective-weight count
    while the budget is positive, so the last may overshoot it; a fresh
    gradient then finds what is still ineffective, which is dropped and becomes the carry
    (a layer left alone passes the carry on unchanged). Linear layers: see the module docstring
    (``rng`` places their weights; without one they are left alone, as in the reference).
    Layers in ``fixed`` (N:M patterned: a moved weight would break its group) are left alone and
    pass the carry on.
    """
    _, stale = counter.gradient(masks)
    carry = 0
    rows = []
    for p in counter.params:
        before = int(np.count_nonzero(masks[p.name]))
        if p.name in fixed:
            rows.append({"layer": p.name, "ineffective": None, "carry": carry, "kept": before, "pattern": True})
            continue
        if not conv.get(p.name):
            if rng is None:
                rows.append({"layer": p.name, "ineffective": None, "carry": carry, "kept": before})
                continue
            ineffective, carry = _fix_linear(counter, masks, p, carry, rng)
            rows.append({"layer": p.name, "ineffective": ineffective, "carry": carry, "kept": int(np.count_nonzero(masks[p.name]))})
            continue
        oi_shape = p.to_oi(masks[p.name]).shape
        kept = p.to_oi(masks[p.name]).reshape(oi_shape[0], oi_shape[1], -1)
        effective = kept & p.to_oi(stale[p.name] > 0).reshape(kept.shape)
        ineffective = int(np.count_nonzero(kept & ~effective))
        budget = ineffective + carry
        if budget > 1:
            filled = _fill(effective.copy(), budget, bool(shortcut.get(p.name)))
            masks[p.name] = p.from_oi(filled.reshape(oi_shape)).copy()
            _, fresh = counter.gradient(masks)
            still = filled & ~p.to_oi(fresh[p.name] > 0).reshape(filled.shape)
            carry = int(np.count_nonzero(still))
            masks[p.name] = p.from_oi((filled & ~still).reshape(oi_shape)).copy()
        rows.append({"layer": p.name, "ineffective": ineffective, "carry": carry, "kept": int(np.count_nonzero(masks[p.name]))})
    return {"layers": rows, "carry_lost": carry}


def _fix_linear(counter: PathCounter, masks: dict[str, np.ndarray], p: Param, carry: int, rng: np.random.Generator) -> tuple[int, int]:
    """Move a linear layer's ineffective weights (plus the carry) onto free on-path positions; (ineffective, new carry)."""
    _, grad = counter.gradient(masks)
    kept = masks[p.name]
    on_path = grad[p.name] > 0
    ineffective = int(np.count_nonzero(kept & ~on_path))
    budget = ineffective + carry
    if budget <= 1:
        return ineffective, carry
    free = np.flatnonzero((~kept & on_path).ravel())
    take = rng.permutation(free)[:budget]
    new = (kept & on_path).ravel()
    new[take] = True
    masks[p.name] = new.reshape(kept.shape)
    return ineffective, budget - int(take.size)


def _fill(kept: np.ndarray, budget: int, column_wise: bool) -> np.ndarray:
    """Switch on whole kernels (or input columns) with the most effective weights first."""
    out_ch, in_ch, taps = kept.shape
    if column_wise:
        rank = kept.sum(axis=(0, 2))
        for i in np.lexsort((np.arange(in_ch), -rank)):
            if budget <= 0:
                break
            budget -= out_ch * taps - int(kept[:, i, :].sum())
            kept[:, i, :] = True
        return kept
    flat = kept.reshape(out_ch * in_ch, taps)
    rank = flat.sum(axis=1)
    for k in np.lexsort((np.arange(rank.size), -rank)):
        if budget <= 0:
            break
        budget -= taps - int(flat[k].sum())
        flat[k] = True
    return kept
