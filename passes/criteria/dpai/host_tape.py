"""The channel tape's numpy matrix-vector layer: y = W (x / m), m = max x, log P += log m, with its backward bound once.

:class:`HostMatVec` is :class:`~pai_compiler.passes.criteria.dpai.tape.Weighted` of kind ``mv`` on
the numpy back-end for a layer whose weight is a fixed :class:`DenseWeight` written once per step
(one use of a prunable weight): the forward and backward of ``Weighted`` through the back-end's
own ``normalise`` / ``normalise_backward``, with the weight, its gradient buffer and the slots
bound at compile time instead of looked up through the weight source and the generic kind
dispatch every step (ResNet-20 runs 22 of
these per step, where that dispatch was a third of the tape's time).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pai_compiler.passes.criteria.dpai.ops import Ops
from pai_compiler.passes.criteria.dpai.tape import DenseWeight, Weighted

__all__ = ["HostMatVec", "host_matvec_applies"]


def host_matvec_applies(ops: Ops, kind: str, weight: Any, accumulate_grad: bool) -> bool:
    """numpy, a chan-vector product, a fixed weight with a gradient buffer, written (not added) once per step."""
    return ops.name == "numpy" and kind == "mv" and isinstance(weight, DenseWeight) and weight.grad is not None and not accumulate_grad


class HostMatVec(Weighted):
    """``Weighted`` (kind ``mv``) on numpy, the weight and its gradient bound (see the module docstring)."""

    def __init__(self, ops: Ops, src: int, dst: int, weight: DenseWeight, logs: list[Any]) -> None:
        super().__init__(ops, src, dst, weight, False, "mv", 1, logs)
        self.src, self.dst, self.w, self.gw = src, dst, weight.w, weight.grad

    def forward(self, env: list[Any]) -> None:
        xh, self.saved, log_m = self.ops.normalise(env[self.src])
        self.logs.append(log_m)
        env[self.dst] = self.w @ xh

    def backward(self, env: list[Any], genv: list[Any]) -> None:
        gy = genv[self.dst]
        if gy is None:
            self.gw.fill(0)
            return
        saved, self.saved = self.saved, None
        xh = self.ops.rescaled(saved)
        np.multiply(gy[:, None], xh[None, :], out=self.gw)
        gx = self.ops.normalise_backward(gy @ self.w, saved, xh)
        src = self.src
        genv[src] = gx if genv[src] is None else genv[src] + gx
