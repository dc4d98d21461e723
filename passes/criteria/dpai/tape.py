"""Instructions of the channel-level tape, each with a hand-written backward.

A weighted instruction normalises its input (x / max x, log max x added to log P) and applies
the kernel-level matrix W; its backward hands dlogP/dW (an outer product) to the layer's
weight source and returns dlogP/dx through W^T and the max. A source (``DenseWeight``: fixed
arrays, e.g. slices of the flat kernel buffers; or one rebuilt on demand from a compact state)
gives W with ``matrix()`` and takes the gradient with ``put_grad``. Sums,
scalings, reshapes, transposes, expansions, concat, split and gathers by constant indices (``Take``)
have exact backwards; any other
op runs its interpreter rule under torch autograd (``TorchOp``). Gradients of a value used
several times are added (never in place, as arrays may be shared). Ops that run a torch rule
under autograd (``TorchOp``, ``TorchWeightedOp``) live in ``_dpai_torchops``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pai_compiler.passes.criteria.dpai.ops import Ops
from pai_compiler.passes.criteria.dpai.token_rows import RowGroups, group_gradient_into, row_groups, rows_times

__all__ = ["Instr", "WeightSource", "DenseWeight", "Weighted", "Sum", "Scale", "Reshape", "Transpose", "Expand", "Cat", "Split", "Take", "accumulate"]


def accumulate(genv: list[Any], slot: int, g: Any) -> None:
    genv[slot] = g if genv[slot] is None else genv[slot] + g


class Instr:
    """One tape entry: ``forward`` fills env[outs]; ``backward`` adds into genv[ins]."""

    def __init__(self, ops: Ops, ins: Sequence[int], outs: Sequence[int]) -> None:
        self.ops, self.ins, self.outs = ops, tuple(ins), tuple(outs)

    def forward(self, env: list[Any]) -> None:
        raise NotImplementedError

    def backward(self, env: list[Any], genv: list[Any]) -> None:
        raise NotImplementedError


class WeightSource:
    """A kernel-level weight [out, in/groups] of the tape and the sink of its gradient."""

    def matrix(self) -> Any:
        raise NotImplementedError

    def put_grad(self, gw: Any | None, accumulate: bool, w: Any) -> None:
        """One use's dlogP/dW (None: no gradient reached it); ``accumulate``: add to earlier uses'."""
        raise NotImplementedError

    def grad_target(self, accumulate: bool) -> Any | None:
        """Where a use may write its dlogP/dW directly (instead of ``put_grad``), or None."""
        return None


class DenseWeight(WeightSource):
    """A fixed array W and, for a prunable layer, the array its gradient is written to."""

    def __init__(self, ops: Ops, w: Any, grad: Any | None) -> None:
        self.ops, self.w, self.grad = ops, w, grad

    def matrix(self) -> Any:
        return self.w

    def put_grad(self, gw: Any | None, accumulate: bool, w: Any) -> None:
        if self.grad is None:
            return
        if gw is not None:
            self.ops.write(self.grad, gw, accumulate)
        elif not accumulate:
            self.ops.fill_zero(self.grad)

    def grad_target(self, accumulate: bool) -> Any | None:
        return self.grad if not accumulate else None  # the first write of a step: no temporary, no copy


class Weighted(Instr):
    """y = W (x / max x): ``mv`` (chan vector), ``grouped``, ``depthwise`` or ``full`` (linear on [..., I])."""

    def __init__(self, ops: Ops, src: int, dst: int, weight: WeightSource, accumulate_grad: bool, kind: str, groups: int, logs: list[Any]) -> None:
        super().__init__(ops, [src], [dst])
        self.weight, self.acc, self.kind, self.groups, self.logs = weight, accumulate_grad, kind, groups, logs
        self.saved: Any = None
        self.rows: RowGroups | None = None  # numpy ``full``: the input's distinct rows (``token_rows``)

    def forward(self, env: list[Any]) -> None:
        xh, self.saved, log_m = self.ops.normalise(env[self.ins[0]])
        self.logs.append(log_m)
        w, kind = self.weight.matrix(), self.kind
        if kind == "mv":
            y = w @ xh
        elif kind == "depthwise":
            y = w[:, 0] * xh
        elif kind == "grouped":
            y = (w.reshape(self.groups, -1, w.shape[1]) @ xh.reshape(self.groups, -1, 1)).reshape(-1)
        elif self.ops.name == "numpy":  # a token matrix: each distinct row once
            self.rows = row_groups(xh.reshape(-1, xh.shape[-1]))
            y = xh @ w.T if self.rows is None else (self.rows.unique @ w.T)[self.rows.inverse].reshape(xh.shape[:-1] + (w.shape[0],))
        else:
            y = xh @ w.T
        env[self.outs[0]] = y

    def backward(self, env: list[Any], genv: list[Any]) -> None:
        gy = genv[self.outs[0]]
        if gy is None:
            self.weight.put_grad(None, self.acc, None)
            return
        saved, self.saved = self.saved, None
        xh = self.ops.rescaled(saved)
        w, kind, groups = self.weight.matrix(), self.kind, self.groups
        target = self.weight.grad_target(self.acc) if kind in ("mv", "full") else None
        if kind == "mv" and target is not None:  # the same products, written in place
            self.ops.outer_into(target, gy, xh)
            accumulate(genv, self.ins[0], self.ops.normalise_backward(gy @ w, saved, xh))
            return
        if kind == "full" and self.ops.name == "numpy":
            self._token_backward(gy, xh, w, target, saved, genv)
            return
        if target is not None:  # the same products, written in place (a one-row GEMM is ~10x slower than the outer product)
            rows = gy.reshape(-1, w.shape[0]).shape[0]
            if kind == "mv" or rows == 1:
                self.ops.outer_into(target, gy.reshape(-1), xh.reshape(-1))
            else:
                self.ops.matmul_into(target, gy.reshape(-1, w.shape[0]).T, xh.reshape(-1, w.shape[1]))
            accumulate(genv, self.ins[0], self.ops.normalise_backward(gy @ w, saved, xh))
            return
        if kind == "mv":
            gw, gxh = gy[:, None] * xh[None, :], gy @ w
        elif kind == "depthwise":
            gw, gxh = (gy * xh)[:, None], gy * w[:, 0]
        elif kind == "grouped":
            out_ch = w.shape[0]
            gw = (gy.reshape(groups, -1, 1) * xh.reshape(groups, 1, -1)).reshape(out_ch, -1)
            gxh = (gy.reshape(groups, 1, -1) @ w.reshape(groups, -1, w.shape[1])).reshape(-1)
        else:
            gw = gy.reshape(-1, w.shape[0]).T @ xh.reshape(-1, w.shape[1])
            gxh = gy @ w
        self.weight.put_grad(gw, self.acc, w)
        accumulate(genv, self.ins[0], self.ops.normalise_backward(gxh, saved, xh))

    def _token_backward(self, gy: Any, xh: Any, w: Any, target: Any | None, saved: Any, genv: list[Any]) -> None:
        """``full`` on numpy: dlogP/dW by the input's row groups (or one outer product for one
        row), written in place where it may be; dlogP/dx multiplies each distinct gradient row once."""
        rows, self.rows = self.rows, None
        grad_rows, x_rows = gy.reshape(-1, w.shape[0]), xh.reshape(-1, w.shape[1])
        gw = target if target is not None else self.ops.zeros(w.shape)
        if rows is not None:
            group_gradient_into(gw, rows, grad_rows)
        elif grad_rows.shape[0] == 1:  # a one-row GEMM is ~10x slower than the outer product
            self.ops.outer_into(gw, grad_rows[0], x_rows[0])
        else:
            self.ops.matmul_into(gw, grad_rows.T, x_rows)
        if target is None:
            self.weight.put_grad(gw, self.acc, w)
        gxh = rows_times(grad_rows, w).reshape(xh.shape)
        accumulate(genv, self.ins[0], self.ops.normalise_backward(gxh, saved, xh))


class Sum(Instr):
    """y = sum of inputs (broadcast); ``reduce[i]`` = (axes to sum, input shape) or None."""

    def __init__(self, ops: Ops, ins: Sequence[int], out: int, reduce: Sequence[tuple[tuple[int, ...], tuple[int, ...]] | None]) -> None:
        super().__init__(ops, ins, [out])
        self.reduce = list(reduce)

    def forward(self, env: list[Any]) -> None:
        xs = [env[i] for i in self.ins]
        y = xs[0]
        for x in xs[1:]:
            y = y + x
        env[self.outs[0]] = y

    def backward(self, env: list[Any], genv: list[Any]) -> None:
        g = genv[self.outs[0]]
        if g is None:
            return
        for slot, red in zip(self.ins, self.reduce):
            accumulate(genv, slot, g if red is None else self.ops.sum_to(g, red[0]).reshape(red[1]))


class Scale(Instr):
    def __init__(self, ops: Ops, src: int, dst: int, factor: float) -> None:
        super().__init__(ops, [src], [dst])
        self.factor = float(factor)

    def forward(self, env: list[Any]) -> None:
        env[self.outs[0]] = env[self.ins[0]] * self.factor

    def backward(self, env: list[Any], genv: list[Any]) -> None:
        if genv[self.outs[0]] is not None:
            accumulate(genv, self.ins[0], genv[self.outs[0]] * self.factor)


class Reshape(Instr):
    def __init__(self, ops: Ops, src: int, dst: int, in_shape: Sequence[int], out_shape: Sequence[int]) -> None:
        super().__init__(ops, [src], [dst])
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def forward(self, env: list[Any]) -> None:
        env[self.outs[0]] = env[self.ins[0]].reshape(self.out_shape)

    def backward(self, env: list[Any], genv: list[Any]) -> None:
        if genv[self.outs[0]] is not None:
            accumulate(genv, self.ins[0], genv[self.outs[0]].reshape(self.in_shape))


class Transpose(Instr):
    def __init__(self, ops: Ops, src: int, dst: int, perm: Sequence[int]) -> None:
        super().__init__(ops, [src], [dst])
        self.perm = tuple(perm)
        self.inverse = tuple(sorted(range(len(perm)), key=lambda a: perm[a]))

    def forward(self, env: list[Any]) -> None:
        env[self.outs[0]] = self.ops.transpose(env[self.ins[0]], self.perm)

    def backward(self, env: list[Any], genv: list[Any]) -> None:
        if genv[self.outs[0]] is not None:
            accumulate(genv, self.ins[0], self.ops.transpose(genv[self.outs[0]], self.inverse))


class Expand(Instr):
    """A chan vector [C] -> the full map [N, C, *spatial] it stands for (every sample of a static batch N alike)."""

    def __init__(self, ops: Ops, src: int, dst: int, shape: Sequence[int]) -> None:
        super().__init__(ops, [src], [dst])
        self.shape = tuple(shape)
        self.view = (1, shape[1]) + (1,) * (len(shape) - 2)
        self.axes = tuple(a for a in range(len(shape)) if a != 1)

    def forward(self, env: list[Any]) -> None:
        env[self.outs[0]] = self.ops.broadcast_to(env[self.ins[0]].reshape(self.view), self.shape)

    def backward(self, env: list[Any], genv: list[Any]) -> None:
        if genv[self.outs[0]] is not None:
            accumulate(genv, self.ins[0], self.ops.sum_to(genv[self.outs[0]], self.axes).reshape(-1))


class Cat(Instr):
    def __init__(self, ops: Ops, ins: Sequence[int], out: int, axis: int, sizes: Sequence[int]) -> None:
        super().__init__(ops, ins, [out])
        self.axis, self.sizes = axis, list(sizes)

    def forward(self, env: list[Any]) -> None:
        env[self.outs[0]] = self.ops.cat([env[i] for i in self.ins], self.axis)

    def backward(self, env: list[Any], genv: list[Any]) -> None:
        g = genv[self.outs[0]]
        if g is not None:
            for slot, part in zip(self.ins, self.ops.split(g, self.sizes, self.axis)):
                accumulate(genv, slot, part)


class Split(Instr):
    def __init__(self, ops: Ops, src: int, outs: Sequence[int], axis: int, shapes: Sequence[Sequence[int]]) -> None:
        super().__init__(ops, [src], outs)
        self.axis, self.shapes = axis, [tuple(s) for s in shapes]
        self.sizes = [s[axis] for s in self.shapes]

    def forward(self, env: list[Any]) -> None:
        for slot, part in zip(self.outs, self.ops.split(env[self.ins[0]], self.sizes, self.axis)):
            env[slot] = part

    def backward(self, env: list[Any], genv: list[Any]) -> None:
        grads = [genv[s] for s in self.outs]
        if all(g is None for g in grads):
            return
        parts = [self.ops.zeros(shape) if g is None else g for g, shape in zip(grads, self.shapes)]
        accumulate(genv, self.ins[0], self.ops.cat(parts, self.axis))


class Take(Instr):
    """y = x's entries at constant ``indices`` along ``axis`` (ONNX Gather: the index array's shape
    replaces the axis); backward adds the gradient back at those indices (in order, as
    ``index_select``'s backward does), zeros elsewhere."""

    def __init__(self, ops: Ops, src: int, dst: int, indices: Any, axis: int, in_shape: Sequence[int], out_shape: Sequence[int]) -> None:
        super().__init__(ops, [src], [dst])
        self.index, self.axis = indices, axis
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.taken = self.in_shape[:axis] + (len(indices),) + self.in_shape[axis + 1 :]  # before the index shape is restored

    def forward(self, env: list[Any]) -> None:
        env[self.outs[0]] = self.ops.take(env[self.ins[0]], self.index, self.axis).reshape(self.out_shape)

    def backward(self, env: list[Any], genv: list[Any]) -> None:
        g = genv[self.outs[0]]
        if g is not None:
            accumulate(genv, self.ins[0], self.ops.take_backward(g.reshape(self.taken), self.index, self.axis, self.in_shape))
