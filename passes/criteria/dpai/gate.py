"""The gate rule for a product of two activations by sums: paths(A @ B)[m, n] = sum_k A[m, k] + sum_k B[k, n].

paths(A @ B) = A @ 1 + 1 @ B (a path through a product goes through one factor, the other is a
unit gate) is an outer sum of A's row sums and B's column sums, so the tape computes it without
the two GEMMs with all-ones matrices that the interpreter's rule runs (an attention layer's
Q K^T and scores V: [heads, tokens, tokens] by [heads, tokens, head_dim], four GEMMs forward and
four backward under autograd). Backward: dlogP/dA[m, k] = sum_n g[m, n] and dlogP/dB[k, n] =
sum_m g[m, n], each broadcast over k, then summed over the batch axes its operand broadcast
along. The counts are the GEMMs' up to float rounding (the sums run in another order).
Operands with fewer than two dimensions (numpy's vector products) keep the interpreter's rule.
"""
from __future__ import annotations

from typing import Any

from pai_compiler.passes.criteria.dpai.geometry import reduction
from pai_compiler.passes.criteria.dpai.ops import Ops
from pai_compiler.passes.criteria.dpai.tape import Instr, accumulate

__all__ = ["GateMatMul", "gate_matmul_applies"]


def gate_matmul_applies(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> bool:
    """Both operands are stacks of matrices with matching inner sizes (static shapes)."""
    return len(a_shape) >= 2 and len(b_shape) >= 2 and a_shape[-1] == b_shape[-2]


class GateMatMul(Instr):
    """y = rowsum(A)[..., :, None] + colsum(B)[..., None, :], broadcast over the batch axes."""

    def __init__(self, ops: Ops, a: int, b: int, out: int, a_shape: tuple[int, ...], b_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        super().__init__(ops, [a, b], [out])
        self.a_shape, self.b_shape, self.out_shape = tuple(a_shape), tuple(b_shape), tuple(out_shape)
        # the batch axes each operand broadcast along (the operand padded to the output's rank)
        self.a_batch = _padded_reduction(self.a_shape, self.out_shape)
        self.b_batch = _padded_reduction(self.b_shape, self.out_shape)

    def forward(self, env: list[Any]) -> None:
        a, b = env[self.ins[0]], env[self.ins[1]]
        rows = self.ops.sum_to(a, (a.ndim - 1,))  # [..., M, 1]
        cols = self.ops.sum_to(b, (b.ndim - 2,))  # [..., 1, N]
        env[self.outs[0]] = rows + cols

    def backward(self, env: list[Any], genv: list[Any]) -> None:
        g = genv[self.outs[0]]
        if g is None:
            return
        ops, rank = self.ops, len(self.out_shape)
        per_row = ops.sum_to(g, (rank - 1,))  # [..., M, 1]: every k of row m gets the row's total
        per_col = ops.sum_to(g, (rank - 2,))  # [..., 1, N]: every k of column n gets the column's total
        accumulate(genv, self.ins[0], ops.broadcast_to(_to_operand(ops, per_row, self.a_batch, self.a_shape), self.a_shape))
        accumulate(genv, self.ins[1], ops.broadcast_to(_to_operand(ops, per_col, self.b_batch, self.b_shape), self.b_shape))


def _padded_reduction(shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The output's batch axes an operand of ``shape`` broadcast along (None: none)."""
    batch = reduction(shape[:-2], out_shape[:-2])
    return None if batch is None else batch[0]


def _to_operand(ops: Ops, total: Any, axes: tuple[int, ...] | None, shape: tuple[int, ...]) -> Any:
    """A [..., M, 1] or [..., 1, N] total summed over the batch axes its operand broadcast along,
    reshaped to the operand's rank (leading axes the operand lacks are dropped)."""
    if axes is None:
        return total
    summed = ops.sum_to(total, axes)
    return summed.reshape(summed.shape[summed.ndim - len(shape) :]) if summed.ndim > len(shape) else summed
