"""Instructions of the channel-level tape, each with a hand-written backward.

A weighted instruction normalises its input (x / max x, log max x added to log P) and applies
the kernel-level matrix W; its backward writes dlogP/dW (an outer product) into the layer's
slice of the flat kernel-gradient buffer and returns dlogP/dx through W^T and the max. Sums,
scalings, reshapes, transposes, expansions, concat and split have exact backwards; any other
op runs its interpreter rule under torch autograd (``TorchOp``). Gradients of a value used
several times are added (never in place, as arrays may be shared).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pai_compiler.passes.criteria._dpai_ops import Ops

__all__ = ["Instr", "Weighted", "Sum", "Scale", "Reshape", "Transpose", "Expand", "Cat", "Split", "TorchOp", "TorchWeightedOp", "accumulate"]


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


class Weighted(Instr):
    """y = W (x / max x): ``mv`` (chan vector), ``grouped``, ``depthwise`` or ``full`` (linear on [..., I])."""

    def __init__(self, ops: Ops, src: int, dst: int, w: Any, grad: Any | None, accumulate_grad: bool, kind: str, groups: int, logs: list[Any]) -> None:
        super().__init__(ops, [src], [dst])
        self.w, self.grad, self.acc, self.kind, self.groups, self.logs = w, grad, accumulate_grad, kind, groups, logs
        out_ch, per_group = w.shape
        self.w3 = w.reshape(groups, out_ch // groups, per_group)
        self.saved: Any = None

    def forward(self, env: list[Any]) -> None:
        xh, self.saved, log_m = self.ops.normalise(env[self.ins[0]])
        self.logs.append(log_m)
        w, kind = self.w, self.kind
        if kind == "mv":
            y = w @ xh
        elif kind == "depthwise":
            y = w[:, 0] * xh
        elif kind == "grouped":
            y = (self.w3 @ xh.reshape(self.groups, -1, 1)).reshape(-1)
        else:
            y = xh @ w.T
        env[self.outs[0]] = y

    def backward(self, env: list[Any], genv: list[Any]) -> None:
        gy = genv[self.outs[0]]
        if gy is None:
            if self.grad is not None and not self.acc:
                self.ops.fill_zero(self.grad)
            return
        xh = self.saved[1]
        w, kind, groups = self.w, self.kind, self.groups
        if kind == "mv":
            gw, gxh = gy[:, None] * xh[None, :], gy @ w
        elif kind == "depthwise":
            gw, gxh = (gy * xh)[:, None], gy * w[:, 0]
        elif kind == "grouped":
            out_ch = w.shape[0]
            gw = (gy.reshape(groups, -1, 1) * xh.reshape(groups, 1, -1)).reshape(out_ch, -1)
            gxh = (gy.reshape(groups, 1, -1) @ self.w3).reshape(-1)
        else:
            gw = gy.reshape(-1, w.shape[0]).T @ xh.reshape(-1, w.shape[1])
            gxh = gy @ w
        if self.grad is not None:
            self.ops.write(self.grad, gw, self.acc)
        accumulate(genv, self.ins[0], self.ops.normalise_backward(gxh, self.saved))


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
    """A chan vector [C] -> the full map [1, C, *spatial] it stands for."""

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


class TorchOp(Instr):
    """Any other op: its torch rule under autograd, converted from/to the back-end arrays."""

    def __init__(self, ops: Ops, ins: Sequence[int], outs: Sequence[int], fn: Callable[[list[Any]], list[Any]]) -> None:
        super().__init__(ops, ins, outs)
        self.fn = fn
        self.saved: Any = None

    def forward(self, env: list[Any]) -> None:
        import torch

        args = [self.ops.to_torch(env[i]).detach().requires_grad_(True) for i in self.ins]
        with torch.enable_grad():
            outs = self.fn(args)
        self.saved = (args, outs)
        for slot, t in zip(self.outs, outs):
            env[slot] = self.ops.wrap(t)

    def backward(self, env: list[Any], genv: list[Any]) -> None:
        import torch

        args, outs = self.saved
        pairs = [(t, self.ops.to_torch(genv[s])) for t, s in zip(outs, self.outs) if genv[s] is not None and t.requires_grad]
        if not pairs:
            return
        grads = torch.autograd.grad([p[0] for p in pairs], args, [p[1] for p in pairs], allow_unused=True)
        for slot, g in zip(self.ins, grads):
            if g is not None:
                accumulate(genv, slot, self.ops.wrap(g))


class TorchWeightedOp(Instr):
    """A weighted node without a hand-written rule (fused attention): its interpreter rule under autograd.

    As the interpreter does with ``scaling="dpai"``: the first input is divided by its max and
    the log of that max, plus any ``rule_log_scale`` the rule reports, enters log P. The
    kernel-level weights (``(param, array, grad view or None, accumulate)``) are fed to the
    rule as differentiable tensors, so dlogP/dW lands in the layers' gradient slices.
    """

    def __init__(self, ops: Ops, ins: Sequence[int], outs: Sequence[int], it: Any, node: Any, rule: Callable[..., list[Any]], weights: Sequence[tuple[Any, Any, Any, bool]], logs: list[Any]) -> None:
        super().__init__(ops, ins, outs)
        self.it, self.node, self.rule, self.weights, self.logs = it, node, rule, list(weights), logs
        self.saved: Any = None

    def forward(self, env: list[Any]) -> None:
        import torch

        args = [self.ops.to_torch(env[i]).detach().requires_grad_(True) for i in self.ins]
        leaves = []
        for param, array, _, _ in self.weights:
            w = self.ops.to_torch(array).detach().requires_grad_(True)
            order = [param.out_axis] + ([param.in_axis] if param.in_axis is not None else [])
            inverse = tuple(sorted(range(w.dim()), key=lambda a: (order + [x for x in range(w.dim()) if x not in order])[a]))
            leaves.append(w)
            self.it.weights[param.name] = w.permute(inverse) if inverse != tuple(range(w.dim())) else w
        with torch.enable_grad():
            first = args[0]
            m = first.detach().max()
            log_term = torch.zeros((), dtype=first.dtype, device=first.device)
            if m > 0:
                m = first.max()
                first = first / m
                log_term = log_term + m.log()
            outs = self.rule(self.it, self.node, [first, *args[1:]])
            extra = self.it.__dict__.pop("rule_log_scale", None)
            if extra is not None:
                log_term = log_term + extra
        self.saved = (args, leaves, outs, log_term)
        self.logs.append(self.ops.wrap(log_term) if self.ops.name == "torch" else float(log_term))
        for slot, t in zip(self.outs, outs):
            env[slot] = self.ops.wrap(t)

    def backward(self, env: list[Any], genv: list[Any]) -> None:
        import torch

        args, leaves, outs, log_term = self.saved
        pairs = [(t, self.ops.to_torch(genv[s])) for t, s in zip(outs, self.outs) if genv[s] is not None and t.requires_grad]
        if log_term.requires_grad:
            pairs.append((log_term, torch.ones_like(log_term)))
        grads = torch.autograd.grad([p[0] for p in pairs], args + leaves, [p[1] for p in pairs], allow_unused=True) if pairs else [None] * (len(args) + len(leaves))
        for slot, g in zip(self.ins, grads[: len(args)]):
            if g is not None:
                accumulate(genv, slot, self.ops.wrap(g))
        for (_, _, grad, acc), g in zip(self.weights, grads[len(args) :]):
            if grad is not None:
                if g is None:
                    if not acc:
                        self.ops.fill_zero(grad)
                else:
                    self.ops.write(grad, self.ops.wrap(g), acc)
