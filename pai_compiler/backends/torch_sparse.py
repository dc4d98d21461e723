"""Sparse-execution torch module: the IR's real semantics, each conv/linear dense or on a sparse kernel.

``SparseModule(graph)`` holds every float Param masked once (``W * M``) as a buffer and runs the
graph with the IR interpreter's ``real`` semantics through a forward compiled once per input
signature (:mod:`~pai_compiler.backends.sparse_plan`: one bound call per node, no per-call
lookups; node by node only when a layer hook watches); ``install(node, kernel)`` makes a
conv/linear node run a :mod:`~pai_compiler.backends.sparse_kernels` or
:mod:`~pai_compiler.backends.sparse_operator` kernel instead of its dense layer (``dense=True``:
a packed dense layer, see :mod:`~pai_compiler.backends.sparse_fusion`, which also folds
BatchNorms and ReLUs into convs), ``set_memory_format`` holds 4-d tensors channels_last;
``forward_form = "traced"`` runs the plan's checked TorchScript trace instead of its Python loop
(:mod:`~pai_compiler.backends.sparse_traced`; a per-signature cache, never pickled). Which
kernel each layer gets is measured in :mod:`~pai_compiler.backends.sparse_select`, which forward in
:mod:`~pai_compiler.backends.sparse_forward`. The module
is for inference (weights are buffers; train the ``CompactModule``), pickles whole
(``torch.save`` / ``torch.load(..., weights_only=False)``) and moves with ``.to(device)``.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import sympy
import torch  # a module class needs nn.Module at import time (like pai_compiler.interp)
from torch import nn

from pai_compiler.backends.sparse_kernels import SparseConv2d, SparseLinear, dense_conv
from pai_compiler.backends.sparse_operator import OPERATOR_LIMIT, ConvOperator, operator_entries
from pai_compiler.backends.sparse_plan import ForwardPlan, Signature, compile_plan, signature_of
from pai_compiler.backends.sparse_traced import TraceKey, TracedForward, trace_key, trace_plan
from pai_compiler.errors import PaicError
from pai_compiler.interp import Interpreter, is_float_array, torch_ready
from pai_compiler.interp_tables import rule_for
from pai_compiler.ir import Graph, Node, OpKind, Param

__all__ = ["SparseModule", "sparse_kernel", "Kernel", "OPERATOR", "FORWARDS", "TRACED"]

Kernel = nn.Module
LayerHook = Callable[[Node, list[torch.Tensor]], None]
#: the conv form that is one sparse matrix on the flattened input (sparse_operator.ConvOperator)
OPERATOR = "operator"
#: most input signatures whose compiled forward a module keeps
PLAN_CACHE = 8
#: how a module runs its plan: the Python loop (plan) or its TorchScript trace (traced), see sparse_traced
FORWARDS = ("plan", "traced")
TRACED = "traced"


class _ModuleInterpreter(Interpreter):
    """The real-mode interpreter reading every Param from the module's (pre-masked) tensors."""

    shape_memo: dict[tuple[int, tuple[tuple[str, int], ...]], tuple[Any, list[int]]] = {}  # set per module: sympy is slow

    def const(self, p: Param) -> torch.Tensor:
        if p.name in self.weights:
            return self.weights[p.name]
        return super().const(p)

    def dims(self, shape: Any) -> list[int]:
        key = (id(shape), tuple(sorted(self.bind.items())))
        found = self.shape_memo.get(key)
        if found is None or found[0] is not shape:  # the memo holds the shape, so its id is not reused
            found = self.shape_memo[key] = (shape, super().dims(shape))
        return list(found[1])


def _masked_tensor(p: Param) -> torch.Tensor:
    data = torch_ready(p.data)
    tensor = torch.tensor(data.astype(np.float32) if data.dtype == np.float64 else data)
    if p.mask is not None:
        tensor = tensor * torch.from_numpy(np.asarray(p.mask)).to(tensor.dtype)
    return tensor


def _safe_key(name: str, used: set[str]) -> str:
    key = "".join(ch if ch.isalnum() else "_" for ch in name).strip("_") or "t"
    key = f"t_{key}"
    while key in used:
        key += "_"
    used.add(key)
    return key


class SparseModule(nn.Module):
    """Runs ``graph`` with pre-masked weights; nodes named in ``kernels`` run their sparse kernel."""

    def __init__(self, graph: Graph) -> None:
        super().__init__()
        self.graph = graph.clone()
        self.graph.meta.pop("torch_module", None)  # a live source module refuses pickling
        self.keys: dict[str, str] = {}
        used: set[str] = set()
        for p in self.graph.params():
            if is_float_array(p.data):
                self.keys[p.name] = _safe_key(p.name, used)
                self.register_buffer(self.keys[p.name], _masked_tensor(p))
        self.kernels = nn.ModuleDict()
        self.kernel_of: dict[str, str] = {}  # node name -> key in self.kernels
        self.memory_format = "contiguous"  # or channels_last: 4-d activations and weights NHWC
        self.folded_bias: dict[str, str] = {}  # conv node -> buffer of its bias with a BatchNorm folded in
        self.passthrough: set[str] = set()  # nodes folded into their producer
        self.fused_relu: set[str] = set()  # conv nodes whose output goes through ReLU (its node a passthrough)
        self.dense_of: dict[str, str] = {}  # node name -> key of its packed dense kernel in self.kernels
        self._rules: dict[str, Any] = {}  # node name -> interpreter rule, looked up once
        self._shape_memo: dict[Any, Any] = {}
        self._symbolic: list[tuple[int, int, str]] | None = None
        self._plans: dict[tuple[Signature, bool], ForwardPlan] = {}  # per input signature (and sparse or not)
        self.forward_form = "plan"  # or "traced": calls run the plan's TorchScript trace where one checks out
        #: with "traced": the input signatures that take the trace (the build's: the shape it timed); None: every one.
        #: Other shapes run the plan, so a new sequence length never pays a trace (about 1.5 s on a small GPT-2)
        self.trace_signatures: set[Signature] | None = None
        self._traces: dict[TraceKey, TracedForward] = {}  # per input signature and strides: a cache, never pickled

    def invalidate_plans(self) -> None:
        """Forget the compiled forwards and their traces (they hold the kernels and tensors of the time they were built)."""
        self._plans = {}
        self._traces = {}

    def _apply(self, fn: Any, recurse: bool = True) -> SparseModule:  # .to(), .float(): new tensors, stale plans
        self.invalidate_plans()
        return super()._apply(fn, recurse)

    def set_memory_format(self, memory_format: str) -> None:
        """Hold 4-d weights (and run 4-d inputs) ``contiguous`` or ``channels_last`` (same values)."""
        layout = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}[memory_format]
        for key in self.keys.values():
            tensor = getattr(self, key)
            if tensor.dim() == 4 and tensor.layout == torch.strided:
                setattr(self, key, tensor.contiguous(memory_format=layout))
        self.memory_format = memory_format
        self.invalidate_plans()

    def format_twin(self, memory_format: str) -> SparseModule:
        """A module sharing this one's kernels and tensors that runs in ``memory_format`` (for timing
        both formats alternating; its own 4-d buffers are converted copies)."""
        twin = copy.copy(self)
        twin._buffers = dict(self._buffers)
        twin.set_memory_format(memory_format)
        return twin

    def install(self, node_name: str, kernel: Kernel | None, *, dense: bool = False) -> None:
        """Run ``node_name`` on the sparse ``kernel`` (None: back to the dense layer); with
        ``dense=True`` make ``kernel`` the node's dense layer instead."""
        self.invalidate_plans()
        table = self.dense_of if dense else self.kernel_of
        key = table.pop(node_name, None)
        if key is not None:
            del self.kernels[key]
        if kernel is not None:
            key = _safe_key(node_name, set(self.kernels.keys()))
            self.kernels[key] = kernel
            table[node_name] = key

    def add_buffer(self, name: str, tensor: torch.Tensor) -> str:
        """Register ``tensor`` under a fresh key derived from ``name``; returns the key."""
        key = _safe_key(name, set(self.keys.values()) | set(self.folded_bias.values()) | set(self._buffers))
        self.register_buffer(key, tensor)
        self.invalidate_plans()
        return key

    def readers(self) -> dict[str, int]:
        """Param name -> the number of nodes reading it."""
        counts: dict[str, int] = {}
        for node in self.graph.nodes:
            for p in node.params.values():
                counts[p.name] = counts.get(p.name, 0) + 1
        return counts

    def drop_unused_weights(self) -> None:
        """Free the dense copies of weights that only sparse kernels read (smaller file)."""
        self.invalidate_plans()
        readers = self.readers()
        for node_name in [*self.kernel_of, *self.dense_of]:
            node = self.graph.node(node_name)
            for role in ("weight", "bias"):
                p = node.params.get(role)
                if p is not None and readers.get(p.name) == 1 and p.name in self.keys:
                    delattr(self, self.keys.pop(p.name))
            if node_name in self.folded_bias and (node_name in self.dense_of or node_name in self.kernel_of):
                delattr(self, self.folded_bias.pop(node_name))
        for node_name in self.passthrough:
            for p in self.graph.node(node_name).params.values():
                if readers.get(p.name) == 1 and p.name in self.keys:
                    delattr(self, self.keys.pop(p.name))

    def conv_bias(self, it: Interpreter, node: Node) -> torch.Tensor | None:
        """The bias a conv node adds (its BatchNorm folded in, if one was)."""
        if node.name in self.folded_bias:
            return getattr(self, self.folded_bias[node.name])
        return it.weight(node.params["bias"]) if "bias" in node.params else None

    def interpreter(self) -> Interpreter:
        """A real-mode interpreter reading this module's (pre-masked, folded) tensors."""
        return _ModuleInterpreter(self.graph, weights=self.tensors())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, key) for name, key in self.keys.items()}

    def bound_interpreter(self, inputs: Sequence[torch.Tensor]) -> Interpreter:
        """A real-mode interpreter on this module's tensors and device, the symbolic input dims bound to ``inputs``."""
        weights = self.tensors()
        ref = next(iter(weights.values()), None)
        device = ref.device if ref is not None else (inputs[0].device if inputs else torch.device("cpu"))
        it = _ModuleInterpreter(self.graph, mode="real", dtype=torch.float32, device=device, weights=weights)
        it.bind = self._bindings(inputs)
        it.shape_memo = self._shape_memo
        return it

    def plan(self, inputs: Sequence[torch.Tensor], *, sparse: bool = True) -> ForwardPlan:
        """The compiled forward for the signature of ``inputs`` (built on first use, then cached)."""
        key = (signature_of(inputs), sparse)
        found = self._plans.get(key)
        if found is None:
            if len(self._plans) >= PLAN_CACHE:
                self._plans.clear()
            found = self._plans[key] = compile_plan(self, inputs, sparse=sparse)
        return found

    def traced(self, inputs: Sequence[torch.Tensor]) -> TracedForward:
        """The checked TorchScript trace of the plan for ``inputs``' signature and strides (built on first use,
        then cached; its ``forward`` is None, with the reason, where tracing failed or differed)."""
        key = trace_key(inputs)
        found = self._traces.get(key)
        if found is None:
            if len(self._traces) >= PLAN_CACHE:
                self._traces.clear()
            found = self._traces[key] = trace_plan(self.plan(inputs), inputs, self)
        return found

    def run(self, inputs: Sequence[torch.Tensor], on_layer: LayerHook | None = None, *, sparse: bool = True) -> list[torch.Tensor]:
        """Evaluate the graph (``sparse=False``: every layer on its dense kernel); with ``on_layer(node, args)``,
        seeing the inputs of every conv/linear node, node by node through the interpreter instead of the plan.
        With ``forward_form == "traced"`` the chosen kernels run through the plan's checked trace (the plan where there is none)."""
        if on_layer is None:
            if sparse and self.forward_form == TRACED and (self.trace_signatures is None or signature_of(inputs) in self.trace_signatures):
                traced = self.traced(inputs)
                if traced.forward is not None:
                    return traced.run(inputs)
            return self.plan(inputs, sparse=sparse).run(inputs)
        it = self.bound_interpreter(inputs)
        device = it.device
        env: dict[str, torch.Tensor] = {}
        feed = {v.name: t for v, t in zip(self.graph.inputs, inputs)}
        outputs: list[torch.Tensor] = []
        for node in self.graph.nodes:
            if node.kind is OpKind.INPUT:
                t = feed[node.outputs[0].name].to(device)
                if t.is_floating_point():
                    t = t.float()
                    if self.memory_format == "channels_last" and t.dim() == 4:
                        t = t.contiguous(memory_format=torch.channels_last)
                env[node.outputs[0].name] = t
                continue
            if node.kind is OpKind.OUTPUT:
                outputs.append(env[node.inputs[0].name])
                continue
            args = [env[v.name] for v in node.inputs]
            if on_layer is not None and node.kind in (OpKind.CONV, OpKind.LINEAR):
                on_layer(node, args)
            for v, t in zip(node.outputs, self.evaluate(it, node, args, sparse=sparse)):
                env[v.name] = t
        return outputs

    def evaluate(self, it: Interpreter, node: Node, args: list[torch.Tensor], *, sparse: bool = True) -> list[torch.Tensor]:
        key = self.kernel_of.get(node.name) if sparse else None
        if key is not None:
            out = self.kernels[key](args[0])
            return [torch.relu_(out) if node.name in self.fused_relu else out]
        if node.name in self.passthrough:
            return [args[0]]
        key = self.dense_of.get(node.name)
        if key is not None:  # the packed dense conv, its ReLU fused
            return [self.kernels[key](args[0])]
        if node.kind is OpKind.CONV:
            a = node.attrs
            out = dense_conv(args[0], it.oi_weight(node.params["weight"]), self.conv_bias(it, node), a["pads"], a["strides"], a["dilations"], a["groups"])
            return [torch.relu_(out) if node.name in self.fused_relu else out]  # a 1-d/3-d conv: no packed kernel fuses it
        rule = self._rules.get(node.name)
        if rule is None:
            rule = self._rules[node.name] = rule_for(node, "real")
        if rule is None:
            raise PaicError(f"node {node.name!r} ({node.kind.value}): cannot be evaluated in torch")
        return rule(it, node, args)

    def _bindings(self, inputs: Sequence[torch.Tensor]) -> dict[str, int]:
        """Symbolic input dims bound to this run's sizes (where they are is found once)."""
        if self._symbolic is None:
            self._symbolic = [(i, axis, d.name if isinstance(d, sympy.Symbol) else d) for i, v in enumerate(self.graph.inputs)
                              for axis, d in enumerate(v.shape or ()) if isinstance(d, (sympy.Symbol, str))]
        bind: dict[str, int] = {}
        for index, axis, name in self._symbolic:
            if index < len(inputs) and axis < inputs[index].dim():
                bind.setdefault(name, int(inputs[index].shape[axis]))
        return bind

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_rules={}, _shape_memo={}, _symbolic=None, _plans={}, _traces={})  # per-process caches (rules may be lambdas)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for name, default in (("_plans", {}), ("_traces", {}), ("forward_form", "plan"), ("trace_signatures", None)):  # pickled before these existed
            self.__dict__.setdefault(name, default)

    def forward(self, *inputs: torch.Tensor) -> Any:
        outs = self.run(list(inputs))
        return outs[0] if len(outs) == 1 else tuple(outs)


def sparse_kernel(module: SparseModule, node: Node, layout: str, gather: str = "index",
                  in_shape: Sequence[int] | None = None) -> Kernel | None:
    """The sparse kernel for ``node`` in ``layout`` (conv: reading its taps by ``gather``, or as one
    matrix on inputs shaped like ``in_shape`` (any batch) with ``gather="operator"``), or None where no
    sparse form applies."""
    if node.params["weight"].name not in module.keys:  # the interpreter would read the unfolded graph weight instead
        raise PaicError(f"node {node.name!r}: the module no longer holds its weight (drop_unused_weights ran); build kernels before")
    it = module.interpreter()
    weight = it.oi_weight(node.params["weight"])
    bias = module.conv_bias(it, node) if node.kind is OpKind.CONV else (it.weight(node.params["bias"]) if "bias" in node.params else None)
    if not bool((weight != 0).any()):
        return None
    a = node.attrs
    if node.kind is OpKind.CONV and gather == OPERATOR:
        if layout != "csr" or in_shape is None or operator_entries(weight, tuple(in_shape[2:]), a["pads"], a["strides"],
                                                                     a["dilations"]) > OPERATOR_LIMIT:
            return None
        return ConvOperator(weight, bias, a["pads"], a["strides"], a["dilations"], a["groups"], tuple(in_shape[1:]))
    if node.kind is OpKind.CONV:
        if weight.dim() != 4 or a["groups"] != 1:
            return None
        return SparseConv2d(weight, bias, a["pads"], a["strides"], a["dilations"], layout=layout, gather=gather)
    if weight.dim() != 2:
        return None
    return SparseLinear(weight, bias, alpha=a.get("alpha", 1.0), beta=a.get("beta", 1.0), layout=layout)
