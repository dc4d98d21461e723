"""SynFlow's abs-linearised network and one round of its scores, |theta ⊙ dR/dtheta| / max, R = 1ᵀ f_|theta|(1).

Built once per run: a private clone with every floating-point parameter replaced by its
absolute value (an additive attention mask excepted: see :func:`is_additive_mask`), its
Interpreter (real mode, ``lookup="ones"``) and the all-ones input. The scored weights live in
flat buffers, concatenated in ``params`` order (the order a global top-k breaks ties in):
``magnitudes`` |theta|, ``masks`` (bool), ``live`` = |theta| * mask (the round's weights; each
layer's leaf is a view of it) and ``scores``. A round writes them in place, so the only
per-round allocations are autograd's own (activations and one gradient per weight), and the
top-k reads the scores without a concatenation. The arithmetic is the reference's, op for op
(``w * m``, ``|g * w|``, ``/ max``), so the scores are bit-identical to computing them per layer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pai_compiler.errors import PaicError
from pai_compiler.ir import Graph, Param
from pai_compiler.pass_infra import AnalysisManager
from pai_compiler.passes.analysis.bindings import sample_bindings
from pai_compiler.passes.analysis.paths import ones_inputs
from pai_compiler.passes.criteria.snip import torch_device, torch_dtype

if TYPE_CHECKING:
    import torch

__all__ = ["LinearisedNet", "is_additive_mask"]

_MASK_VALUE = -1e30


def is_additive_mask(p: Param) -> bool:
    """A non-prunable constant with ``-inf`` or ``finfo.min``-like entries: an attention mask, not a parameter."""
    if p.prunable or p.numel == 0:
        return False
    data = np.asarray(p.data, dtype=np.float64)
    return bool(np.any(data <= _MASK_VALUE))


def _check_inputs(graph: Graph) -> None:
    """SynFlow feeds all-ones float inputs: an integer input is accepted as lookup indices, or as a
    mask that picks no embedding row (ones: attend everything), not as both."""
    from pai_compiler.interp_tables import index_lookups, indexes_lookups_only  # imports torch (heavy)

    for v in graph.inputs:
        if not v.dtype.startswith("float") and not indexes_lookups_only(v) and index_lookups(v):
            raise PaicError(f"synflow: input {v.name!r} is {v.dtype}; SynFlow feeds an all-ones float input "
                            "(an integer input is accepted only as the indices of embedding lookups, or as a mask)")


class LinearisedNet:
    """The abs-linearised clone, its Interpreter, the all-ones input and the flat weight buffers."""

    def __init__(self, graph: Graph, am: AnalysisManager, params: list[Param], precision: str) -> None:
        import torch  # heavy optional dependency

        from pai_compiler.interp import Interpreter, is_float_array, torch_ready  # imports torch (heavy)

        self.precision = precision
        self.dtype = torch_dtype(precision)
        self.device = device = torch_device(am, "synflow")
        net = graph.clone()
        for p in net.params():
            if is_float_array(p.data) and not is_additive_mask(p):
                net.set_param_data(p, np.abs(torch_ready(p.data)))
        by_name = {p.name: p for p in net.params()}
        self.names = [p.name for p in params]
        self.shapes = [tuple(p.shape) for p in params]
        bounds = np.cumsum([0] + [p.numel for p in params]).tolist()
        self.spans = list(zip(bounds[:-1], bounds[1:]))
        self.magnitudes = torch.empty(bounds[-1], dtype=self.dtype, device=device)
        self.masks = torch.empty(bounds[-1], dtype=torch.bool, device=device)
        for p, (start, stop) in zip(params, self.spans):
            magnitude = torch.as_tensor(torch_ready(by_name[p.name].data), device=device).reshape(-1)
            self.magnitudes[start:stop].copy_(magnitude)  # copy_ converts the dtype, like param_tensor's .to
            self.masks[start:stop].copy_(torch.as_tensor(p.mask_or_ones(), device=device).reshape(-1))
        self.live = torch.empty_like(self.magnitudes)
        self.scores = torch.empty_like(self.magnitudes)
        bind = sample_bindings(net, am.context.extra.get("bind"))
        self.interp = Interpreter(net, mode="real", dtype=self.dtype, device=device, bind=bind, lookup="ones")
        _check_inputs(net)
        # lookup="ones": every lookup outputs ones, so the (float) ones fed as its indices are never read
        self.ones = ones_inputs(net, bind, self.dtype, device)
        self.total: Any = 0.0  # R of the last round

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each scored weight's slice of a flat buffer, in its own shape."""
        return {name: flat[start:stop].view(shape) for name, shape, (start, stop) in zip(self.names, self.shapes, self.spans)}

    def score_round(self) -> None:
        """``scores`` = |theta ⊙ dR/dtheta| at ``masks`` (pruned weights 0), divided by the round's maximum."""
        import torch  # heavy optional dependency

        self.live.copy_(self.masks)  # 1.0 / 0.0 in place: a bool operand of mul would be converted into a fresh buffer
        self.live.mul_(self.magnitudes)  # w * 1.0 or w * 0.0: the masked weights, exactly
        leaves = {name: view.requires_grad_(True) for name, view in self.views(self.live).items()}
        self.interp.weights = leaves
        try:
            total = sum(o.sum() for o in self.interp.run(self.ones, keep_values=False).outputs if o.is_floating_point())
            if not isinstance(total, torch.Tensor) or not total.requires_grad:
                self.scores.zero_()
                return
            if not torch.isfinite(total):
                hint = "use synflow{precision=float64}" if self.precision == "float32" else "the network is too deep to score"
                raise PaicError(f"synflow: R = sum of outputs is {float(total)} in {self.precision}; {hint}")
            self.total = total.detach()
            total.backward()
            for (name, leaf), score in zip(leaves.items(), self.views(self.scores).values()):
                if leaf.grad is None:
                    score.zero_()
                else:
                    torch.mul(leaf.grad, leaf.detach(), out=score)
        finally:
            self.interp.weights = {}
        self._normalise()

    def _normalise(self) -> None:
        import torch  # heavy optional dependency

        self.scores.abs_()
        if not self.scores.numel():
            return
        top = self.scores.max()
        top = torch.where(top > 0, top, torch.ones_like(top))  # no host sync on --device cuda
        self.scores.div_(top)

    def kept(self) -> int:
        """Weights the masks keep (one host sync)."""
        return int(self.masks.sum())
