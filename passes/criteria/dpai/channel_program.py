"""Channel-level path count: DPaI's R_P with every conv feature map reduced to one value per channel.

A conv activation [1, C, *spatial] is stored as its interior value, a vector [C] ("chan").
A conv acts through the kernel-level matrix W[o, i] = number of kept live taps of kernel
(o, i): y = W (x / max x) per group, and dlogP/dM[o, i, t] = dlogP/dW[o, i] for every live
tap t, so the gradient is computed per kernel and the caller expands it over taps. Taps that
never read a real input pixel (padding around small maps) are *dead* and count zero, which
keeps the effective weights, kernels and nodes those of the per-pixel count.

Every other op follows the interpreter's ``paths`` rules (identity for norm/activation/softmax,
residual adds sum, pooling keeps the model's mean/max, data constants are zero, products
follow the gate rule paths(a@b) = paths(a)@1 + 1@paths(b)), on the chan vector where that is
exact and on the materialised tensor otherwise (reshape, matmul, attention...). Attention
weights therefore get real path gradients: Q, K and V reach the output through the two gated
matmuls, which run as row and column sums (``gate``: no GEMMs with all-ones matrices); a gather
by constant indices (q, k, v out of a packed projection) is a ``Take`` with an exact backward.
DPaI's normalisation is kept: each conv/linear input is divided by its max m_l and
log P = log(sum(out)) + sum_l log m_l. Forward and backward run on a hand-written tape
(``_dpai_tape``), in numpy on the CPU and in torch on other devices. The prunable weights W are
slices of one flat kernel-level buffer ``counts`` (gradient: ``grad``) unless ``sources`` gives
each layer's weight source (band state: ``_dpai_bandstep`` builds W one layer at a time).
Forward values are dropped after their last reader (no backward reads them) and gradients
after their producer's backward, so a step holds little beyond what the backward needs.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pai_compiler.errors import ModelError, PaicError
from pai_compiler.ir import Graph, Node, OpKind
from pai_compiler.passes.criteria.dpai.layout import LayerInfo, Layout
from pai_compiler.passes.criteria.dpai.ops import make_ops
from pai_compiler.passes.criteria.dpai.host_tape import HostMatVec, host_matvec_applies
from pai_compiler.passes.criteria.dpai.gate import GateMatMul, gate_matmul_applies
from pai_compiler.passes.criteria.dpai.geometry import chan_pool_factor, conv_tap_live, reduction
from pai_compiler.passes.criteria.dpai.tape import Cat, DenseWeight, Expand, Instr, Reshape, Scale, Split, Sum, Take, Transpose, Weighted, WeightSource
from pai_compiler.passes.criteria.dpai.torch_ops import TorchOp, TorchWeightedOp

if TYPE_CHECKING:
    import torch

__all__ = ["ChannelProgram", "CHANNEL_RULES", "conv_tap_live"]


class ChannelProgram:
    """The compiled tape. ``counts`` (kernel-level W) in, ``grad`` (dlogP/dW) and log P out.

    ``sources(layer, uses)``, if given, makes each prunable layer's weight source instead
    (``counts`` and ``grad`` are then None); ``uses`` is how many tape entries read the layer.
    """

    def __init__(
        self, graph: Graph, layout: Layout, shapes: Mapping[str, tuple[int, ...]], device: str | torch.device, bind: Mapping[str, int],
        sources: Callable[[LayerInfo, int], WeightSource] | None = None,
    ) -> None:
        import torch  # heavy: torch loads when a program is built, not when dpai is imported

        from pai_compiler.interp import Interpreter  # heavy: interp imports torch

        self.graph, self.layout, self.shapes = graph, layout, shapes
        self.ops = make_ops(device)
        self._it = Interpreter(graph, mode="paths", dtype=torch.float32, device="cpu" if self.ops.name == "numpy" else device, pool="model", bind=bind)
        self._make_source = sources
        self._sources: dict[str, WeightSource] = {}
        self.counts = self.grad = None
        if sources is None:
            self.counts = torch.zeros(layout.n_kernels, dtype=torch.float32, device=device)
            self.grad = torch.zeros(layout.n_kernels, dtype=torch.float32, device=device)
            self._counts, self._grad = self.ops.wrap(self.counts), self.ops.wrap(self.grad)
        self._layer_of = {layer.name: layer for layer in layout.layers}
        self.tape: list[Instr] = []
        self.logs: list[Any] = []
        self.consts: dict[int, Any] = {}
        self.outputs: list[tuple[int, float, tuple[int, ...]]] = []
        self.slot: dict[str, int] = {}
        self.stored: dict[int, tuple[int, ...]] = {}  # slot -> stored array shape
        self.chan: set[int] = set()
        self._full: dict[str, int] = {}
        self._compile()
        # forward values no backward reads: free each after its last reader (outputs are summed after the forward)
        last = {slot: i for i, instr in enumerate(self.tape) for slot in instr.ins}
        keep = {slot for slot, _, _ in self.outputs} | set(self.consts)
        self._dies_after: dict[int, list[int]] = {}
        for slot, i in last.items():
            if slot not in keep:
                self._dies_after.setdefault(i, []).append(slot)
        # the run's plan, bound once: (forward, slots freed after it) in order, (backward, outputs) in reverse
        self._env0: list[Any] = [self.consts.get(slot) for slot in range(len(self.stored))]
        self._forward_plan = [(instr.forward, tuple(self._dies_after.get(i, ()))) for i, instr in enumerate(self.tape)]
        self._backward_plan = [(instr.backward, instr.outs) for instr in reversed(self.tape)]

    # ---- compile ---------------------------------------------------------------------------
    def _new(self, shape: tuple[int, ...], chan: bool = False, name: str | None = None) -> int:
        slot = len(self.stored)
        self.stored[slot] = tuple(shape)
        if chan:
            self.chan.add(slot)
        if name is not None:
            self.slot[name] = slot
        return slot

    def _full_slot(self, name: str) -> int:
        """Slot holding ``name`` as its full logical tensor (adds an Expand once for chan values)."""
        slot = self.slot[name]
        if slot not in self.chan:
            return slot
        if name not in self._full:  # keyed by value: aliases of one slot may differ in spatial size
            shape = self.shapes[name]
            self._full[name] = self._new(shape)
            self.tape.append(Expand(self.ops, slot, self._full[name], shape))
        return self._full[name]

    def _compile(self) -> None:
        users: dict[str, list[Node]] = {}
        for node in self.graph.nodes:
            if node.kind in (OpKind.CONV, OpKind.LINEAR, OpKind.ATTENTION):
                for p in node.params.values():
                    if p.name in self._layer_of:
                        users.setdefault(p.name, []).append(node)
        self._last_user = {name: nodes[-1] for name, nodes in users.items()}
        self._uses = {name: len(nodes) for name, nodes in users.items()}
        self._node_of: list[Node] = []  # tape index -> the node it was compiled from
        for node in self.graph.nodes:
            try:
                _index_data_or_rule(node)(self, node)
            except (ValueError, IndexError, KeyError, RuntimeError) as exc:
                raise _unsupported(node, exc) from exc
            self._node_of += [node] * (len(self.tape) - len(self._node_of))

    def _torch_op(self, node: Node) -> None:
        from pai_compiler.interp_tables import rule_for  # heavy: the rule tables import torch

        rule = rule_for(node, "paths")  # an embedding lookup (opaque, op="embedding"): a path source
        if rule is None or node.kind is OpKind.ATTENTION:
            raise PaicError(f"dpai: node {node.name!r} ({node.kind.value}) has no path-count rule")
        it = self._it
        full = [self._full_slot(v.name) for v in node.inputs]
        outs = [self._new(self.shapes[v.name], name=v.name) for v in node.outputs]
        self.tape.append(TorchOp(self.ops, full, outs, lambda args: rule(it, node, args)))

    def _attention(self, node: Node) -> None:
        """A fused attention node: the interpreter's path rule under autograd (gate rule inside)."""
        import torch  # heavy: torch loads when a program is built, not when dpai is imported

        from pai_compiler.interp import Interpreter  # heavy: interp imports torch

        it = Interpreter(self.graph, mode="paths", dtype=torch.float32, device=self._it.device, pool="model", scaling="dpai", bind=self._it.bind)
        weights = []
        for p in node.params.values():
            layer = self._layer_of.get(p.name)
            if layer is not None:
                weights.append((p, self._source(layer), self._last_user.get(p.name) is not node))
        full = [self._full_slot(v.name) for v in node.inputs]
        outs = [self._new(self.shapes[v.name], name=v.name) for v in node.outputs]
        self.tape.append(TorchWeightedOp(self.ops, full, outs, it, node, Interpreter.evaluate, weights, self.logs))

    def _weighted(self, node: Node, chan: bool) -> None:
        import torch  # heavy: torch loads when a program is built, not when dpai is imported

        p = node.params["weight"]
        layer = self._layer_of.get(p.name)
        src = self.slot[node.inputs[0].name]
        if chan and src not in self.chan:  # a real map (after a reshape or pad): each channel's interior value, its max over batch and pixels
            not_channel = (0, *range(2, len(self.shapes[node.inputs[0].name])))
            collapsed = self._new((self.shapes[node.inputs[0].name][1],), True)
            self.tape.append(TorchOp(self.ops, [src], [collapsed], lambda a: [a[0].amax(dim=not_channel)]))
            src = collapsed
        elif not chan:
            src = self._full_slot(node.inputs[0].name)
        groups = int(node.attrs.get("groups", 1)) if chan else 1
        if layer is not None:
            out_ch, in_ch = p.shape[p.out_axis], p.shape[p.in_axis] if p.in_axis is not None else 1
            weight = self._source(layer)
        else:  # a dense, non-prunable weight (e.g. computed by weight norm: no layout axes): every live tap counts
            x_shape, y_shape = self.shapes[node.inputs[0].name], self.shapes[node.outputs[0].name]
            out_ch, in_ch = (y_shape[1], x_shape[1] // groups) if chan else (y_shape[-1], x_shape[-1])
            live = conv_tap_live(node, x_shape, y_shape).sum() if chan else 1
            w = torch.full((out_ch, in_ch), float(live))
            weight = DenseWeight(self.ops, self.ops.wrap(w.to(self._it.device) if self.ops.name == "torch" else w), None)
        kind = "full" if not chan else "mv" if groups == 1 else "depthwise" if in_ch == 1 and out_ch == groups else "grouped"
        shape = (out_ch,) if chan else self.shapes[node.outputs[0].name]
        dst = self._new(shape, chan, node.outputs[0].name)
        accumulate_grad = layer is not None and self._last_user.get(p.name) is not node
        if host_matvec_applies(self.ops, kind, weight, accumulate_grad):
            self.tape.append(HostMatVec(self.ops, src, dst, weight, self.logs))  # type: ignore[arg-type]
        else:
            self.tape.append(Weighted(self.ops, src, dst, weight, accumulate_grad, kind, groups, self.logs))

    def _source(self, layer: LayerInfo) -> WeightSource:
        """The layer's weight source (one per layer, shared by all its uses)."""
        if layer.name not in self._sources:
            if self._make_source is not None:
                self._sources[layer.name] = self._make_source(layer, self._uses.get(layer.name, 1))
            else:
                a, b, shape = layer.kernel_offset, layer.kernel_offset + layer.kernels, (layer.out_ch, layer.in_ch)
                self._sources[layer.name] = DenseWeight(self.ops, self._counts[a:b].reshape(shape), self._grad[a:b].reshape(shape))
        return self._sources[layer.name]

    # ---- run -------------------------------------------------------------------------------
    def forward_backward(self) -> torch.Tensor:
        """Run the tape forward and backward; fills ``grad``; returns log P (0-d tensor)."""
        import torch  # heavy: torch loads when a program is built, not when dpai is imported

        self.logs.clear()
        env = list(self._env0)
        memo = self.ops.memo
        index = 0
        try:
            for index, (forward, dies) in enumerate(self._forward_plan):
                forward(env)
                for slot in dies:
                    env[slot] = None
                    memo.pop(slot, None)
        except (ValueError, IndexError, RuntimeError) as exc:  # a shape this rule did not foresee: name the node, not numpy
            raise _unsupported(self._node_of[index], exc) from exc
        memo.clear()
        totals = [env[slot].sum() * factor for slot, factor, _ in self.outputs]
        total = totals[0]
        for t in totals[1:]:
            total = total + t
        genv: list[Any] = [None] * len(self.stored)
        if self.ops.name == "numpy":
            total = float(total)
            log_p = (math.log(total) if total > 0 else -math.inf) + sum(self.logs)
            for slot, factor, shape in self.outputs:
                genv[slot] = np.full(shape, factor / total if total > 0 else 0.0, dtype=np.float32)
            result = torch.tensor(log_p)
        else:
            log_p = total.log() + torch.stack(self.logs).sum() if self.logs else total.log()
            seed = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
            for slot, factor, shape in self.outputs:
                genv[slot] = (seed * factor).expand(shape)
            result = log_p
        index = 0
        try:
            for index, (backward, outs) in enumerate(self._backward_plan):
                backward(env, genv)
                for slot in outs:  # read by its producer only
                    genv[slot] = None
        except (ValueError, IndexError, RuntimeError) as exc:
            raise _unsupported(self._node_of[len(self.tape) - 1 - index], exc) from exc
        return result


def _unsupported(node: Node, exc: BaseException) -> ModelError:
    """One line naming the node the channel-level count failed on (numpy's or torch's own message in brackets)."""
    detail = " ".join(str(exc).split())[:160] or type(exc).__name__
    return ModelError(f"dpai: node {node.name!r} ({node.kind.value}): the channel-level path count cannot run it ({detail}); "
                      "try dpai{paths=ref} (per pixel) or another criterion")


# ---- the compile rules, one per op kind ------------------------------------------------------
ChannelRule = Callable[[ChannelProgram, Node], None]


def _index_data_or_rule(node: Node) -> ChannelRule:
    """The node's compile rule; a node computing index data only (integer/bool: ``ids.ne(pad).sum(1) - 1``,
    an integer constant) runs the interpreter's rule, which keeps its real value in paths mode."""
    from pai_compiler.interp_tables import is_index_data  # heavy: the rule tables import torch

    if node.kind not in (OpKind.INPUT, OpKind.OUTPUT) and node.outputs and all(is_index_data(v) for v in node.outputs):
        return ChannelProgram._torch_op
    return CHANNEL_RULES[node.kind]


def _conv_transpose(cp: ChannelProgram, node: Node) -> None:
    """No channel-level rule: a transposed conv's taps land on a stride-dependent subset of the
    output pixels, which one value per channel cannot represent."""
    raise _unsupported(node, ValueError("a transposed conv has no channel-level rule"))


def _input(cp: ChannelProgram, node: Node) -> None:
    """A model input: all ones, one value per channel for a feature map."""
    name = node.outputs[0].name
    shape = cp.shapes[name]
    chan = len(shape) > 2
    slot = cp._new((shape[1],) if chan else shape, chan, name)
    cp.consts[slot] = cp.ops.ones(cp.stored[slot])


def _constant(cp: ChannelProgram, node: Node) -> None:
    """A data constant carries no path: zeros."""
    slot = cp._new(cp.shapes[node.outputs[0].name], name=node.outputs[0].name)
    cp.consts[slot] = cp.ops.zeros(cp.stored[slot])


def _output(cp: ChannelProgram, node: Node) -> None:
    """A model output is summed after the forward (a chan value stands for every pixel of its map, in every sample of a static batch)."""
    name = node.inputs[0].name
    slot = cp.slot[name]
    shape = cp.shapes[name]
    factor = math.prod(shape[:1] + shape[2:]) if slot in cp.chan else 1
    cp.outputs.append((slot, float(factor), cp.stored[slot]))


def _identity_or_rule(cp: ChannelProgram, node: Node) -> None:
    """Norm, activation, softmax: an alias when the shape is kept, else the interpreter's path rule."""
    if cp.shapes[node.inputs[0].name] == cp.shapes[node.outputs[0].name]:
        cp.slot[node.outputs[0].name] = cp.slot[node.inputs[0].name]  # alias: no instruction
    else:
        cp._torch_op(node)


def _all_chan(cp: ChannelProgram, node: Node) -> bool:
    slots = [cp.slot[v.name] for v in node.inputs]
    return bool(slots) and all(s in cp.chan for s in slots)


def _sum(cp: ChannelProgram, node: Node) -> None:
    """Residual adds sum; the gate rule makes a*b -> a + b (on chan vectors where all operands are)."""
    ins, out = node.inputs, node.outputs[0].name
    if _all_chan(cp, node):
        slots = [cp.slot[v.name] for v in ins]
        cp.tape.append(Sum(cp.ops, slots, cp._new(cp.stored[slots[0]], True, out), [None] * len(slots)))
        return
    out_shape = cp.shapes[out]
    full = [cp._full_slot(v.name) for v in ins]
    cp.tape.append(Sum(cp.ops, full, cp._new(out_shape, name=out), [reduction(cp.stored[s], out_shape) for s in full]))


def _matmul(cp: ChannelProgram, node: Node) -> None:
    """A product of two activations: the gate rule by row and column sums (``gate``) where both are
    stacks of matrices and the node has the plain gate rule; otherwise the interpreter's rule."""
    from pai_compiler.interp_path_rules import path_mul  # heavy: the rule tables import torch
    from pai_compiler.interp_tables import rule_for  # heavy: as above

    a, b = node.inputs
    shapes = cp.shapes[a.name], cp.shapes[b.name]
    if rule_for(node, "paths") is not path_mul or not gate_matmul_applies(*shapes):
        cp._torch_op(node)
        return
    out = node.outputs[0].name
    cp.tape.append(GateMatMul(cp.ops, cp._full_slot(a.name), cp._full_slot(b.name), cp._new(cp.shapes[out], name=out), shapes[0], shapes[1], cp.shapes[out]))


def _axis(cp: ChannelProgram, node: Node) -> int:
    out_shape = cp.shapes[node.outputs[0].name] if node.outputs else ()
    return int(node.attrs.get("axis", 0)) % max(len(out_shape), 1)


def _concat(cp: ChannelProgram, node: Node) -> None:
    """Concatenation along channels stays on chan vectors; any other axis on the full tensors."""
    axis, ins, out = _axis(cp, node), node.inputs, node.outputs[0].name
    on_chan = _all_chan(cp, node) and axis == 1
    use = [cp.slot[v.name] for v in ins] if on_chan else [cp._full_slot(v.name) for v in ins]
    ax = 0 if on_chan else axis
    shape = (sum(cp.stored[s][0] for s in use),) if on_chan else cp.shapes[out]
    cp.tape.append(Cat(cp.ops, use, cp._new(shape, on_chan, out), ax, [cp.stored[s][ax] for s in use]))


def _split(cp: ChannelProgram, node: Node) -> None:
    """A split along channels stays on chan vectors; any other axis on the full tensor."""
    axis, ins, outs = _axis(cp, node), node.inputs, node.outputs
    chan = _all_chan(cp, node) and axis == 1
    src = cp.slot[ins[0].name] if chan else cp._full_slot(ins[0].name)
    shapes = [(cp.shapes[v.name][1],) if chan else cp.shapes[v.name] for v in outs]
    cp.tape.append(Split(cp.ops, src, [cp._new(s, chan, v.name) for s, v in zip(shapes, outs)], 0 if chan else axis, shapes))


def _pool(cp: ChannelProgram, node: Node) -> None:
    """Pooling a chan vector scales it by the window's factor; otherwise the interpreter's path rule."""
    in_name, out = node.inputs[0].name, node.outputs[0].name
    factor = chan_pool_factor(node, cp.shapes[in_name]) if _all_chan(cp, node) else None
    if factor is None:
        cp._torch_op(node)
        return
    out_shape = cp.shapes[out]
    src = cp.slot[in_name]
    if factor != 1:
        scaled = cp._new(cp.stored[src], True)
        cp.tape.append(Scale(cp.ops, src, scaled, factor))
        src = scaled
    if len(out_shape) > 2:
        cp.slot[out] = src
    elif out_shape[:1] == (1,):  # (1, C): the vector itself
        cp.tape.append(Reshape(cp.ops, src, cp._new(out_shape, name=out), cp.stored[src], out_shape))
    else:  # (N, C) at a static batch N > 1: one copy per sample
        cp.tape.append(Expand(cp.ops, src, cp._new(out_shape, name=out), out_shape))


def _reshape(cp: ChannelProgram, node: Node) -> None:
    """Reshape and transpose move the values (a chan vector is materialised when it must be), a gather
    by constant indices picks them (``Take``); other data movement: the path rule."""
    if node.attrs.get("op") == "gather":
        _take(cp, node)
        return
    if node.attrs.get("op") not in ("reshape", "transpose"):
        cp._torch_op(node)
        return
    in_name, out = node.inputs[0].name, node.outputs[0].name
    in_shape, out_shape, slot = cp.shapes[in_name], cp.shapes[out], cp.slot[in_name]
    vector_is_tensor = math.prod(in_shape[2:]) == 1 and (not in_shape or in_shape[0] == 1)  # [C] is [1, C, 1...]: not at a static batch > 1
    src = slot if slot not in cp.chan or vector_is_tensor else cp._full_slot(in_name)
    dst = cp._new(out_shape, name=out)
    if node.attrs["op"] == "reshape":
        cp.tape.append(Reshape(cp.ops, src, dst, cp.stored[src], out_shape))
    elif src in cp.chan:  # [C] standing for [1, C, 1, ...]: materialise the 1s first
        mid = cp._new(in_shape)
        cp.tape += [Reshape(cp.ops, src, mid, cp.stored[src], in_shape), Transpose(cp.ops, mid, dst, node.attrs["perm"])]
    else:
        cp.tape.append(Transpose(cp.ops, src, dst, node.attrs["perm"]))


def _take(cp: ChannelProgram, node: Node) -> None:
    """A gather by constant indices (q, k and v out of a packed projection; a class token): ``Take``
    where the node has the plain rule (not one reading index data); otherwise the interpreter's rule."""
    from pai_compiler.interp_index_rules import reshape  # heavy: the rule tables import torch
    from pai_compiler.interp_tables import rule_for  # heavy: as above

    in_name, out = node.inputs[0].name, node.outputs[0].name
    in_shape, a = cp.shapes[in_name], node.attrs
    axis = int(a["axis"]) % len(in_shape)
    flat = np.asarray(a["indices"], dtype=np.int64).reshape(-1)
    flat = np.where(flat < 0, flat + in_shape[axis], flat)
    if rule_for(node, "paths") is not reshape or flat.size == 0 or flat.min() < 0 or flat.max() >= in_shape[axis]:
        cp._torch_op(node)  # out of range: the interpreter's rule says so
        return
    index = flat if cp.ops.name == "numpy" else _index_tensor(flat, cp._it.device)
    cp.tape.append(Take(cp.ops, cp._full_slot(in_name), cp._new(cp.shapes[out], name=out), index, axis, in_shape, cp.shapes[out]))


def _index_tensor(flat: np.ndarray, device: Any) -> Any:
    import torch  # heavy: torch loads when a program is built, not when dpai is imported

    return torch.from_numpy(flat).to(device)


#: how each op kind compiles to tape instructions
CHANNEL_RULES: dict[OpKind, ChannelRule] = {
    OpKind.INPUT: _input,
    OpKind.OUTPUT: _output,
    OpKind.CONSTANT: _constant,
    OpKind.CONV: lambda cp, node: cp._weighted(node, chan=True),
    OpKind.CONV_TRANSPOSE: _conv_transpose,
    OpKind.LINEAR: lambda cp, node: cp._weighted(node, chan=False),
    OpKind.ATTENTION: lambda cp, node: cp._attention(node),
    OpKind.MATMUL: _matmul,
    OpKind.ADD: _sum,
    OpKind.MUL: _sum,
    OpKind.CONCAT: _concat,
    OpKind.SPLIT: _split,
    OpKind.NORM: _identity_or_rule,
    OpKind.POINTWISE: _identity_or_rule,
    OpKind.SOFTMAX: _identity_or_rule,
    OpKind.POOL: _pool,
    OpKind.RESHAPE: _reshape,
    OpKind.OPAQUE: lambda cp, node: cp._torch_op(node),
}
