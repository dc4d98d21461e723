"""The channel tape's numpy matrix-vector layer: y = W (x / m), m = max x, log P += log m, with its backward bound once.

:class:`HostMatVec` is :class:`~pai_compiler.passes.criteria.dpai.tape.Weighted` of kind ``mv`` on
the numpy back-end for a layer whose weight is a fixed :class:`DenseWeight` written once per step
(one use of a prunable weight): the forward and backward of ``Weighted`` + ``NumpyOps.normalise``
/ ``normalise_backward``, the same numpy operations on the same operands in the same order, with
the weight, its gradient buffer and the slots bound at compile time instead of looked up through
the back-end, the weight source and the generic kind dispatch every step (ResNet-20 runs 22 of
these per step, where that dispatch was a third of the tape's time).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from pai_compiler.passes.criteria.dpai.ops import Ops
from pai_compiler.passes.criteria.dpai.tape import DenseWeight, Weighted

__all__ = ["HostMatVec", "host_matvec_applies"]

_max = np.maximum.reduce


def host_matvec_applies(ops: Ops, kind: str, weight: Any, accumulate_grad: bool) -> bool:
    """numpy, a chan-vector product, a fixed weight with a gradient buffer, written (not added) once per step."""
    return ops.name == "numpy" and kind == "mv" and isinstance(weight, DenseWeight) and weight.grad is not None and not accumulate_grad


class HostMatVec(Weighted):
    """``Weighted`` (kind ``mv``) on numpy, the weight and its gradient bound (see the module docstring)."""

    def __init__(self, ops: Ops, src: int, dst: int, weight: DenseWeight, logs: list[Any]) -> None:
        super().__init__(ops, src, dst, weight, False, "mv", 1, logs)
        self.src, self.dst, self.w, self.gw = src, dst, weight.w, weight.grad

    def forward(self, env: list[Any]) -> None:
        x = env[self.src]
        raw = float(_max(x, axis=None)) if x.size else 0.0
        m = raw if raw > 0 else 1.0
        xh = x / m
        self.logs.append(math.log(m))
        self.saved = (x, xh, m, raw)
        env[self.dst] = self.w @ xh

    def backward(self, env: list[Any], genv: list[Any]) -> None:
        gy = genv[self.dst]
        if gy is None:
            self.gw.fill(0)
            return
        (x, xh, m, raw), self.saved = self.saved, None
        np.multiply(gy[:, None], xh[None, :], out=self.gw)
        gxh = gy @ self.w
        gx = gxh / m
        if raw > 0:  # d/dx of (x / max x) and of log max x: the max's share splits evenly over ties
            dm = (1.0 - float(np.vdot(gxh, xh))) / m
            hit = x == raw
            np.add(gx, dm / np.count_nonzero(hit), out=gx, where=hit)
        src = self.src
        genv[src] = gx if genv[src] is None else genv[src] + gx
