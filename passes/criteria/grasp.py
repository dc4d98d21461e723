"""GraSP criterion: score = (H g) ⊙ theta / (|sum((H g) ⊙ theta)| + 1e-10), signed; the lowest are pruned.

As in Synaptic-Flow (``GraSP``, temperature T = 200): with L = cross-entropy(logits / T) on the
prune batch (eval mode, masked initial weights), pass 1 sums the gradients g over the batches
without a graph; pass 2 recomputes the gradients with a graph and backpropagates
z = sum(stop_grad(g) ⊙ g), which leaves H g in the weights' gradients. The score is the
*signed* (H g) ⊙ theta, divided by |sum of scores| + eps. The mask keeps the highest scores,
i.e. prunes the lowest, which is GraSP's "remove the largest -theta ⊙ H g" (the reference's
``score > threshold`` mask). Already pruned weights score 0. Normally run one-shot.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from pai_compiler.errors import UsageError
from pai_compiler.ir import Graph, Param
from pai_compiler.pass_infra import AnalysisManager
from pai_compiler.passes.criteria.base import CriterionPass
from pai_compiler.passes.criteria.snip import (
    Precision,
    check_batch_size,
    check_precision,
    interpreter,
    masked_leaves,
    masked_weights,
    prune_batches,
    prune_loss,
    to_numpy_scores,
    torch_device,
    torch_dtype,
)

__all__ = ["GraspPass", "GRASP_EPS"]

GRASP_EPS = 1e-10


@dataclass(frozen=True)
class GraspPass(CriterionPass):
    """Keep the weights whose removal least reduces the gradient flow ((H g) ⊙ theta, signed)."""

    name: ClassVar[str] = "grasp"
    temperature: float = 200.0
    batch_size: int = 256
    precision: Precision = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_batch_size(self.batch_size, self.name)
        if not self.temperature > 0:
            raise UsageError(f"{self.name}: temperature must be > 0, got {self.temperature}")
        check_precision(self.precision, self.name)

    def scores(self, graph: Graph, am: AnalysisManager, params: list[Param]) -> dict[str, np.ndarray]:
        import torch

        dtype = torch_dtype(self.precision)
        batches = list(prune_batches(graph, am, self.name, self.batch_size, dtype))
        leaves, masks = masked_leaves(params, dtype, torch_device(am, self.name))
        names = list(leaves)
        inputs = [leaves[n] for n in names]

        def loss(x: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
            it = interpreter(graph, am, dtype)  # fresh per chunk: the batch size binds symbolic dims
            it.weights = masked_weights(leaves, masks)
            return prune_loss(it.run(x).outputs[0] / self.temperature, y)

        stopped = [torch.zeros_like(t) for t in inputs]
        for x, y in batches:
            grads = torch.autograd.grad(loss(x, y), inputs, allow_unused=True)
            stopped = [s + g if g is not None else s for s, g in zip(stopped, grads)]
        for x, y in batches:
            grads = torch.autograd.grad(loss(x, y), inputs, create_graph=True, allow_unused=True)
            z = sum((s * g).sum() for s, g in zip(stopped, grads) if g is not None)
            if isinstance(z, torch.Tensor) and z.requires_grad:
                z.backward()
        raw = {n: (t.grad * t.detach()) if t.grad is not None else torch.zeros_like(t) for n, t in zip(names, inputs)}
        norm = torch.abs(sum(s.sum() for s in raw.values())) + GRASP_EPS
        return to_numpy_scores({n: s / norm for n, s in raw.items()})
