"""AutoSparse criterion: score = predictor(features(w0, g0, layer)), global top-k with a per-layer floor.

The learned predictor (``pai_compiler.passes.criteria.autosparse.predictor``, trained with ``paic autosparse
train`` on labels from ``paic autosparse collect``) maps each weight's features at
initialisation -- its value w0, the gradient g0 = dL/dw of the mean cross-entropy on the prune
batch (``--data``, eval mode, summed over chunks of ``batch_size`` as SNIP does; only when the
predictor uses gradient features) and its layer's fan-in/size -- to the predicted fraction of
iterative-pruning rounds it would survive. ``scope=global`` keeps the K highest predictions
over all layers, but first every layer keeps its own top f_l = max(1, ceil(min_density * n_l))
weights, so no layer collapses (the reference code has no such guard); the K - sum(f_l) others
go to the best remaining scores. ``scope=layer`` keeps each layer's allocated count (e.g. after
``erk``). Already pruned weights rank last. ``predictor=default`` is the shipped package data.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from pai_compiler.errors import UsageError
from pai_compiler.ir import Graph, OpKind, Param
from pai_compiler.pass_infra import AnalysisManager, PassResult
from pai_compiler.passes.criteria.base import CriterionPass, allocation_patterns, apply_scores, resolve_keep, topk_mask, warn_empty_layers
from pai_compiler.passes.criteria.snip import (
    check_batch_size, interpreter, masked_leaves, masked_weights, prune_batches, prune_loss, torch_device,
)

if TYPE_CHECKING:
    from pai_compiler.passes.criteria.autosparse.predictor import LayerInfo, Predictor

__all__ = ["AutosparsePass", "floored_topk"]


def floored_topk(scores: list[np.ndarray], keep: int, floors: list[int]) -> list[np.ndarray]:
    """Flat bool masks keeping exactly ``keep`` weights: each layer's top ``floors[l]``, then the global best."""
    forced = [topk_mask(s, f) for s, f in zip(scores, floors)]
    rest = keep - sum(int(m.sum()) for m in forced)
    flat = np.concatenate([np.where(m, -np.inf, np.asarray(s, dtype=np.float64).reshape(-1)) for s, m in zip(scores, forced)])
    extra = topk_mask(flat, max(0, rest)) if rest > 0 else np.zeros(flat.size, dtype=bool)
    out, offset = [], 0
    for m in forced:
        out.append(m | extra[offset : offset + m.size])
        offset += m.size
    return out


def _layer_info(graph: Graph, p: Param) -> LayerInfo:
    from pai_compiler.passes.criteria.autosparse.predictor import LayerInfo

    users = graph.param_users(p)
    kind = users[0].kind.value if users else OpKind.LINEAR.value
    return LayerInfo.from_shape(p.name, kind, p.shape, p.out_axis, p.in_axis)


@dataclass(frozen=True)
class AutosparsePass(CriterionPass):
    """Keep the weights a learned predictor expects to survive iterative pruning."""

    name: ClassVar[str] = "autosparse"
    predictor: str = "default"
    min_density: float = 0.002
    batch_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        check_batch_size(self.batch_size, self.name)
        if isinstance(self.min_density, bool) or not 0.0 <= float(self.min_density) < 1.0:
            raise UsageError(f"{self.name}: min_density must be in [0, 1), got {self.min_density!r}")

    def load(self) -> Predictor:
        from pai_compiler.passes.criteria.autosparse.predictor import load_predictor

        return load_predictor(self.predictor)

    def gradients(self, graph: Graph, am: AnalysisManager, params: list[Param], predictor: Predictor) -> dict[str, np.ndarray] | None:
        """g0 per weight (dL/dw at the masked init weights), or None when the predictor does not use it."""
        from pai_compiler.passes.criteria.autosparse.predictor import GRADIENT_FEATURES

        if not predictor.needs_gradient:
            return None
        if am.context.data is None:
            uses = ", ".join(f for f in predictor.features if f in GRADIENT_FEATURES)
            raise UsageError(f"{self.name}: predictor {self.predictor!r} uses init-gradient features ({uses}): "
                             "pass --data FILE.npz (x_train/y_train, e.g. ../shared/data/cifar10.npz) or --data random, "
                             "or use a predictor trained without gradient features (paic autosparse train --features w,abs_w,log_numel)")
        import torch

        dtype = torch.float32
        batches = list(prune_batches(graph, am, self.name, self.batch_size, dtype))
        leaves, masks = masked_leaves(params, dtype, torch_device(am, self.name))
        for inputs, y in batches:
            it = interpreter(graph, am, dtype)
            it.weights = masked_weights(leaves, masks)
            prune_loss(it.run(inputs).outputs[0], y).backward()
        return {name: (leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)).detach().double().cpu().numpy() for name, leaf in leaves.items()}

    def scores(self, graph: Graph, am: AnalysisManager, params: list[Param]) -> Mapping[str, np.ndarray]:
        predictor = self.load()
        grads = self.gradients(graph, am, params, predictor)
        out = {}
        for p in params:
            score = predictor.score(np.asarray(p.data), None if grads is None else grads[p.name], _layer_info(graph, p))
            if p.mask is not None:
                score[~p.mask] = -1.0  # below every prediction in (0, 1): pruned weights stay pruned
            out[p.name] = score
        return out

    def run(self, graph: Graph, am: AnalysisManager) -> PassResult:
        params = graph.prunable_params()
        if not params:
            raise UsageError(f"{self.name}: the model has no prunable (conv/linear) weights")
        keep = resolve_keep(am, params, self.sparsity, self.scope, self.name)
        scores = self.scores(graph, am, params)
        patterns = allocation_patterns(am)
        if isinstance(keep, dict) or patterns:
            apply_scores(graph, params, scores, keep, patterns)
        else:
            floors = [min(p.numel, max(1, math.ceil(self.min_density * p.numel))) for p in params]
            if sum(floors) > keep:
                am.warn(f"{self.spec()}: the per-layer floors ({sum(floors):,} weights) exceed the budget "
                        f"({keep:,}); only one weight per layer is guaranteed")
                floors = [1] * len(params) if len(params) <= keep else [0] * len(params)
            masks = floored_topk([scores[p.name] for p in params], keep, floors)
            for p, m in zip(params, masks):
                graph.set_mask(p, m.reshape(p.shape))
        warn_empty_layers(am, params, self.spec())
        return PassResult(modified=True, preserved=frozenset())
