"""Tape instructions that run an interpreter rule under torch autograd (channel-level tape).

``TorchOp`` covers every op without a hand-written backward (slices, pads, dynamic gathers,
products of vectors by the gate rule paths(a@b) = paths(a)@1 + 1@paths(b), ...; products of
matrix stacks run as sums, ``gate``); ``TorchWeightedOp`` a weighted node
without one (fused attention), whose kernel-level weights are differentiable leaves. Inputs
are converted to torch once per forward (``torch_input``), and between forward and backward
only the autograd graph holds memory: the rule reads x - 0 (bit-identical to x, the 0 a 0-d
leaf) and the op keeps gradient edges, not its input and output tensors.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pai_compiler.passes.criteria.dpai.ops import Ops
from pai_compiler.passes.criteria.dpai.tape import Instr, WeightSource, accumulate

__all__ = ["TorchOp", "TorchWeightedOp", "torch_input"]


def torch_input(ops: Ops, env: list[Any], slot: int) -> Any:
    """env[slot] as a torch tensor, converted once per forward for all its torch-rule readers."""
    memo = ops.memo
    if slot not in memo:
        memo[slot] = ops.to_torch(env[slot])
    return memo[slot]


class TorchOp(Instr):
    """Any other op: its torch rule under autograd, converted from/to the back-end arrays.

    The rule reads x - 0 (bit-identical to x) with the 0 a 0-d leaf, so between forward and
    backward only the autograd graph (gradient edges, and what the rule itself saves) holds
    memory, not the op's inputs and outputs.
    """

    def __init__(self, ops: Ops, ins: Sequence[int], outs: Sequence[int], fn: Callable[[list[Any]], list[Any]]) -> None:
        super().__init__(ops, ins, outs)
        self.fn = fn
        self.saved: Any = None

    def forward(self, env: list[Any]) -> None:
        import torch
        from torch.autograd.graph import get_gradient_edge

        with torch.enable_grad():
            args = []
            for i in self.ins:
                x = torch_input(self.ops, env, i)
                args.append(x - torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=True))
            outs = self.fn(args)
            self.saved = ([get_gradient_edge(a) for a in args], [get_gradient_edge(t) if t.requires_grad else None for t in outs])
        for slot, t in zip(self.outs, outs):
            env[slot] = self.ops.wrap(t)

    def backward(self, env: list[Any], genv: list[Any]) -> None:
        import torch

        (args, outs), self.saved = self.saved, None
        pairs = [(t, self.ops.to_torch(genv[s])) for t, s in zip(outs, self.outs) if genv[s] is not None and t is not None]
        if not pairs:
            return
        grads = torch.autograd.grad([p[0] for p in pairs], args, [p[1] for p in pairs], allow_unused=True)
        for slot, g in zip(self.ins, grads):
            if g is not None:
                accumulate(genv, slot, self.ops.wrap(g))


class TorchWeightedOp(Instr):
    """A weighted node without a hand-written rule (fused attention): its interpreter rule under autograd.

    As the interpreter does with ``scaling="dpai"``: the first input is divided by its max and
    the log of that max, plus any ``log_scale`` the node's evaluation reports, enters log P. The
    kernel-level weights (``(param, source, accumulate)``) are fed to the rule as
    differentiable tensors, so dlogP/dW reaches each layer's source.
    """

    def __init__(self, ops: Ops, ins: Sequence[int], outs: Sequence[int], it: Any, node: Any, rule: Callable[..., Any], weights: Sequence[tuple[Any, WeightSource, bool]], logs: list[Any]) -> None:
        super().__init__(ops, ins, outs)
        self.it, self.node, self.rule, self.weights, self.logs = it, node, rule, list(weights), logs
        self.saved: Any = None

    def forward(self, env: list[Any]) -> None:
        import torch

        args = [torch_input(self.ops, env, i).detach().requires_grad_(True) for i in self.ins]
        leaves, arrays = [], []
        for param, source, _ in self.weights:
            array = source.matrix()
            w = self.ops.to_torch(array).detach().requires_grad_(True)
            order = [param.out_axis] + ([param.in_axis] if param.in_axis is not None else [])
            inverse = tuple(sorted(range(w.dim()), key=lambda a: (order + [x for x in range(w.dim()) if x not in order])[a]))
            leaves.append(w)
            arrays.append(array)
            self.it.weights[param.name] = w.permute(inverse) if inverse != tuple(range(w.dim())) else w
        with torch.enable_grad():
            first = args[0]
            m = first.detach().max()
            log_term = torch.zeros((), dtype=first.dtype, device=first.device)
            if m > 0:
                m = first.max()
                first = first / m
                log_term = log_term + m.log()
            evaluation = self.rule(self.it, self.node, [first, *args[1:]])
            outs = evaluation.outputs
            if evaluation.log_scale is not None:
                log_term = log_term + evaluation.log_scale
        self.saved = (args, leaves, arrays, outs, log_term)
        self.logs.append(self.ops.wrap(log_term) if self.ops.name == "torch" else float(log_term))
        for slot, t in zip(self.outs, outs):
            env[slot] = self.ops.wrap(t)

    def backward(self, env: list[Any], genv: list[Any]) -> None:
        import torch

        (args, leaves, arrays, outs, log_term), self.saved = self.saved, None
        for param, _, _ in self.weights:
            self.it.weights.pop(param.name, None)
        pairs = [(t, self.ops.to_torch(genv[s])) for t, s in zip(outs, self.outs) if genv[s] is not None and t.requires_grad]
        if log_term.requires_grad:
            pairs.append((log_term, torch.ones_like(log_term)))
        grads = torch.autograd.grad([p[0] for p in pairs], args + leaves, [p[1] for p in pairs], allow_unused=True) if pairs else [None] * (len(args) + len(leaves))
        for slot, g in zip(self.ins, grads[: len(args)]):
            if g is not None:
                accumulate(genv, slot, self.ops.wrap(g))
        for (_, source, acc), array, g in zip(self.weights, arrays, grads[len(args) :]):
            source.put_grad(None if g is None else self.ops.wrap(g), acc, array)
