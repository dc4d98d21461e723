"""Straight-line forward of a SparseModule: one bound callable per node, resolved once per input signature.

``compile_plan(module, inputs)`` walks the graph once for the inputs' shapes, dtypes and device
and turns every node into a :class:`Step` ``env[out] = call(*env[ins])`` over integer value
slots: conv/linear layers call their (sparse or packed dense) kernel's ``forward`` directly,
passthrough nodes (folded norms, fused ReLUs) become slot aliases, reshapes get their concrete
sizes, pointwise/norm/pool/softmax/matmul/add nodes a torch function (a plain 2-d window pool that
of :mod:`~pai_compiler.backends.sparse_pool`) with their attributes and
constants bound, and every other node the interpreter's own rule with the signature's symbolic
dims bound once. ``ForwardPlan.run`` is then a loop over the steps that frees each value after
its last reader; a call costs about what a hand-written ``nn.Module`` of the same ops costs.
Plans hold live tensors and are never pickled: the module rebuilds them on first use.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch  # the plan's steps are torch calls (this module is imported with torch_sparse)
import torch.nn.functional as F

from pai_compiler.backends.sparse_kernels import dense_conv
from pai_compiler.backends.sparse_pool import window_pool_2d
from pai_compiler.errors import PaicError
from pai_compiler.interp import Interpreter
from pai_compiler.interp_rules import BINARY_FN, UNARY_FN
from pai_compiler.interp_tables import rule_for
from pai_compiler.ir import Graph, Node, OpKind

__all__ = ["ForwardPlan", "Step", "PlannedModule", "compile_plan", "signature_of", "Signature"]

Signature = tuple[tuple[tuple[int, ...], torch.dtype, str], ...]
Call = Callable[..., Any]


def signature_of(inputs: Sequence[torch.Tensor]) -> Signature:
    """What a plan is specialised on: every input's shape, dtype and device."""
    return tuple((tuple(t.shape), t.dtype, str(t.device)) for t in inputs)


class PlannedModule(Protocol):
    """What a plan reads of a :class:`~pai_compiler.backends.torch_sparse.SparseModule`."""

    graph: Graph
    kernels: torch.nn.ModuleDict
    kernel_of: dict[str, str]
    dense_of: dict[str, str]
    passthrough: set[str]
    fused_relu: set[str]
    memory_format: str

    def conv_bias(self, it: Interpreter, node: Node) -> torch.Tensor | None: ...

    def bound_interpreter(self, inputs: Sequence[torch.Tensor]) -> Interpreter: ...


@dataclass(frozen=True)
class Step:
    """``env[outputs] = call(*env[inputs])`` (``multi``: ``call`` returns a sequence); then ``env[frees] = None``.

    ``kernel`` is the key in the module's ``kernels`` of the layer kernel the step calls ("" for none)."""

    node: str
    kernel: str
    call: Call
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    multi: bool
    frees: tuple[int, ...]


@dataclass(frozen=True)
class ForwardPlan:
    """The module's forward for one input signature: the input slots, the steps, the output slots."""

    input_slots: tuple[int, ...]
    steps: tuple[Step, ...]
    output_slots: tuple[int, ...]
    slots: int
    device: torch.device
    channels_last: bool
    program: tuple[tuple[str, Call, tuple[int, ...], Any, bool, tuple[int, ...]], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # the steps as plain tuples, a single output as its slot: the loop below does no attribute lookups
        program = tuple((s.node, s.call, s.inputs, s.outputs if s.multi else s.outputs[0], s.multi, s.frees) for s in self.steps)
        object.__setattr__(self, "program", program)

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) != len(self.input_slots):
            raise PaicError(f"model has {len(self.input_slots)} inputs, got {len(inputs)}")
        env: list[Any] = [None] * self.slots
        for slot, t in zip(self.input_slots, inputs):
            t = t.to(self.device)
            if t.is_floating_point():
                t = t.float()
                if self.channels_last and t.dim() == 4:
                    t = t.contiguous(memory_format=torch.channels_last)
            env[slot] = t
        name = ""
        try:
            for name, call, ins, outs, multi, frees in self.program:
                result = call(env[ins[0]]) if len(ins) == 1 else call(*[env[i] for i in ins])
                if multi:
                    for slot, t in zip(outs, result):
                        env[slot] = t
                else:
                    env[outs] = result
                for slot in frees:
                    env[slot] = None
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # a shape the model was not built for, mostly
            detail = " ".join(str(exc).split())[:200]
            raise PaicError(f"node {name!r}: cannot be evaluated in torch on inputs {[tuple(t.shape) for t in inputs]}: {detail}") from exc
        return [env[slot] for slot in self.output_slots]


def _relu_after(kernel_forward: Call) -> Call:
    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.relu_(kernel_forward(x))  # the kernel's output is fresh: in place is safe
    return run


def _generic(rule: Call, it: Interpreter, node: Node) -> Call:
    def run(*args: torch.Tensor) -> list[torch.Tensor]:
        return rule(it, node, list(args))
    return run


def _pointwise(it: Interpreter, node: Node) -> Call | None:
    op = node.attrs["op"]
    if "const" in node.params and op in BINARY_FN:
        const, fn = it.const(node.params["const"]), BINARY_FN[op]
        return (lambda x: fn(const, x)) if node.attrs.get("const_first") else (lambda x: fn(x, const))
    if "const" in node.params or op not in UNARY_FN:
        return None
    if op == "relu":
        return torch.relu
    return partial(UNARY_FN[op], a=node.attrs)


def _reduce(node: Node) -> Call | None:
    """A reducing pool (mean, max, sum or L2 norm over ``axes``) with its axes bound; windowed pools take the rule."""
    a = node.attrs
    if not a.get("reduce"):
        return None
    reduce = {"max": torch.amax, "sum": torch.sum, "l2": partial(torch.linalg.vector_norm, ord=2)}.get(a["mode"], torch.mean)
    return partial(reduce, dim=a["axes"], keepdim=a.get("keepdims", True))


def _batch_norm(it: Interpreter, node: Node) -> Call:
    p = node.params
    scale = it.const(p["scale"]) if "scale" in p else None
    bias = it.const(p["bias"]) if "bias" in p else None
    mean, var, eps = it.const(p["mean"]), it.const(p["var"]), node.attrs.get("epsilon", 0.0)
    return lambda x: F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)


def _layer_norm(it: Interpreter, node: Node) -> Call:
    """``F.layer_norm`` with its shape and reshaped affine parameters resolved on the first call (a
    plan sees one input shape); parameters that do not cover the normalised axes take the rule."""
    p = node.params
    scale = it.const(p["scale"]) if "scale" in p else None
    bias = it.const(p["bias"]) if "bias" in p else None
    eps, axis = node.attrs.get("epsilon", 0.0), node.attrs.get("axis", -1)
    rule = rule_for(node, "real")
    resolved: list[Call] = []

    def first(x: torch.Tensor) -> Call:
        shape = list(x.shape[axis % x.dim():])
        size = math.prod(shape)
        if any(t is not None and t.numel() != size for t in (scale, bias)):
            return lambda y: rule(it, node, [y])[0]  # type: ignore[misc]  (norms always have a rule)
        w = None if scale is None else scale.reshape(shape)
        b = None if bias is None else bias.reshape(shape)
        return lambda y: F.layer_norm(y, shape, w, b, eps)

    def run(x: torch.Tensor) -> torch.Tensor:
        if not resolved:
            resolved.append(first(x))
        return resolved[0](x)
    return run


def _norm(it: Interpreter, node: Node) -> Call | None:
    typ = node.attrs.get("type")
    if typ == "batch":
        return _batch_norm(it, node)
    return _layer_norm(it, node) if typ == "layer" else None


def _gather(node: Node) -> Call:
    """Constant indices along ``axis`` (negative ones read from the end), resolved on the first call; one
    scalar index is a ``select`` (a view: attention's q/k/v picked from a stacked projection, no copy)."""
    a = node.attrs
    indices = torch.as_tensor(np.asarray(a["indices"], dtype=np.int64).reshape(a["indices_shape"]))
    axis = a["axis"]
    if indices.dim() == 0:
        return partial(torch.select, dim=axis, index=int(indices))  # select reads a negative index from the end too
    resolved: list[Any] = []

    def run(x: torch.Tensor) -> torch.Tensor:
        if not resolved:
            flat = torch.where(indices < 0, indices + x.shape[axis], indices).reshape(-1).to(x.device)
            resolved.extend([flat, [*x.shape[:axis], *indices.shape, *x.shape[axis + 1:]]])
        return torch.index_select(x, axis, resolved[0]).reshape(resolved[1])
    return run


def _reshape(it: Interpreter, node: Node) -> Call | None:
    op = node.attrs["op"]
    if op == "reshape":
        return partial(torch.reshape, shape=it.dims(node.outputs[0].shape))
    if op == "transpose":
        return partial(torch.permute, dims=node.attrs["perm"])
    if op == "gather":
        return _gather(node)
    return None


def _dense_conv(module: PlannedModule, it: Interpreter, node: Node) -> Call:
    """A conv with no packed kernel (1-d, 3-d): the plain conv, its bias (folded norm) and fused ReLU bound."""
    bias = module.conv_bias(it, node)
    weight = it.oi_weight(node.params["weight"])
    a = node.attrs
    relu = node.name in module.fused_relu

    def run(x: torch.Tensor) -> torch.Tensor:
        y = dense_conv(x, weight, bias, a["pads"], a["strides"], a["dilations"], a["groups"])
        return torch.relu_(y) if relu else y
    return run


def _lowered(module: PlannedModule, it: Interpreter, node: Node, *, sparse: bool) -> Call | None:
    """The bound single-output callable of a node with a fast form (None: use its generic rule)."""
    key = module.kernel_of.get(node.name) if sparse else None
    if key is not None:
        forward = module.kernels[key].forward
        return _relu_after(forward) if node.name in module.fused_relu else forward
    key = module.dense_of.get(node.name)
    if key is not None:
        return module.kernels[key].forward
    kind = node.kind
    if kind is OpKind.CONV:
        return _dense_conv(module, it, node)
    if kind is OpKind.POINTWISE:
        return _pointwise(it, node)
    if kind is OpKind.ADD and len(node.inputs) == 2:
        return torch.sub if node.attrs.get("op") == "sub" else torch.add
    if kind is OpKind.MATMUL:
        return torch.matmul
    if kind is OpKind.SOFTMAX:
        return partial(F.log_softmax if node.attrs.get("log") else F.softmax, dim=node.attrs["axis"])
    if kind is OpKind.POOL:
        return _reduce(node) or window_pool_2d(node.attrs)
    if kind is OpKind.NORM:
        return _norm(it, node)
    if kind is OpKind.RESHAPE:
        return _reshape(it, node)
    if kind is OpKind.CONSTANT:
        value = rule_for(node, "real")(it, node, [])[0]  # type: ignore[misc]  (constants always have a rule)
        return lambda: value
    return None


def _step_call(module: PlannedModule, it: Interpreter, node: Node, *, sparse: bool) -> tuple[Call, bool]:
    """The node's callable and whether it returns several outputs."""
    call = _lowered(module, it, node, sparse=sparse) if len(node.outputs) == 1 else None
    if call is not None:
        return call, False
    rule = rule_for(node, "real")
    if rule is None:
        raise PaicError(f"node {node.name!r} ({node.kind.value}): cannot be evaluated in torch")
    return _generic(rule, it, node), True


def compile_plan(module: PlannedModule, inputs: Sequence[torch.Tensor], *, sparse: bool = True) -> ForwardPlan:
    """The straight-line forward of ``module`` for the signature of ``inputs`` (``sparse=False``:
    every layer on its dense kernel, the model-level baseline)."""
    graph = module.graph
    it = module.bound_interpreter(inputs)
    slot_of: dict[str, int] = {}  # value name -> slot (a passthrough's output shares its input's)
    count = 0

    def slot(name: str) -> int:
        nonlocal count
        if name not in slot_of:
            slot_of[name], count = count, count + 1
        return slot_of[name]

    input_slots = tuple(slot(v.name) for v in graph.inputs)
    raw: list[Step] = []  # frees filled in once every reader is known
    output_slots: list[int] = []
    for node in graph.nodes:
        if node.kind is OpKind.INPUT:
            continue
        if node.kind is OpKind.OUTPUT:
            output_slots.append(slot_of[node.inputs[0].name])
            continue
        if node.name in module.passthrough:
            slot_of[node.outputs[0].name] = slot_of[node.inputs[0].name]
            continue
        ins = tuple(slot_of[v.name] for v in node.inputs)
        call, multi = _step_call(module, it, node, sparse=sparse)
        kernel = (module.kernel_of.get(node.name) if sparse else None) or module.dense_of.get(node.name, "")
        raw.append(Step(node.name, kernel, call, ins, tuple(slot(v.name) for v in node.outputs), multi, ()))
    steps = _with_frees(raw, set(output_slots))
    return ForwardPlan(input_slots, steps, tuple(output_slots), count, it.device if isinstance(it.device, torch.device) else torch.device(it.device),
                       module.memory_format == "channels_last")


def _with_frees(raw: list[Step], kept: set[int]) -> tuple[Step, ...]:
    """The steps, each freeing the slots it reads (or writes) last; graph outputs are kept."""
    last: dict[int, int] = {}
    for index, step in enumerate(raw):
        for s in step.outputs:
            last.setdefault(s, index)
        for s in step.inputs:
            last[s] = index
    frees: dict[int, list[int]] = {}
    for s, index in last.items():
        if s not in kept:
            frees.setdefault(index, []).append(s)
    return tuple(replace(step, frees=tuple(sorted(frees.get(index, ())))) for index, step in enumerate(raw))

