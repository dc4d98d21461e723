"""Sparse-execution torch module: each conv/linear runs dense or on a sparse kernel, whichever is faster.

``build_sparse_module(graph)`` turns a (compacted, masked) graph into a ``SparseModule``: the
IR's real semantics with every weight masked once, where each groups=1 2-D conv and each linear
layer gets the kernel that a measurement on the target shape (``batch``, ``threads``, device)
says is faster — the dense layer or a :mod:`sparse_kernels` kernel (CSR, on CUDA also BSR).
Timings are medians of ``repeats`` alternating runs after ``warmup`` runs of each candidate; a
sparse kernel is kept only when its median beats the dense one by ``margin`` and its output
equals the dense output (max relative error ``<= 1e-5``). Then the whole model is timed both
ways, alternating; if the sparse choice is not faster, every layer goes back to dense (the
auto choice is never slower than the compact dense model). The module is for inference: its
weights are buffers (train the ``CompactModule`` instead).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import sympy
import torch  # a module class needs nn.Module at import time (like pai_compiler.interp)
from torch import nn

from pai_compiler.backends.sparse_kernels import SparseConv2d, SparseLinear, dense_conv, layout_fits
from pai_compiler.backends.sparse_timing import LayerTiming, SparseExecReport, example_inputs, relative_error, time_alternating
from pai_compiler.errors import PaicError, UsageError
from pai_compiler.interp import Interpreter, is_float_array, rule_for, torch_ready
from pai_compiler.ir import Graph, Node, OpKind, Param

__all__ = ["SparseModule", "build_sparse_module", "choose_kernels", "choose_memory_format", "sparse_kernel", "LayerTiming", "SparseExecReport", "EXACT", "POLICIES"]

#: auto: the faster per layer, never slower as a model; sparse: every layer with a sparse form
#: (exactness tests, experiments); dense: none (the compact model in torch)
POLICIES = ("auto", "sparse", "dense")
#: the largest relative error a sparse kernel may have against the dense layer
EXACT = 1e-5

Kernel = nn.Module
LayerHook = Callable[[Node, list[torch.Tensor]], None]


class _ModuleInterpreter(Interpreter):
    """The real-mode interpreter reading every Param from the module's (pre-masked) tensors."""

    shape_memo: dict[tuple[str, tuple[tuple[str, int], ...]], list[int]] = {}  # symbolic shape -> ints (sympy is slow)

    def const(self, p: Param) -> torch.Tensor:
        if p.name in self.weights:
            return self.weights[p.name]
        return super().const(p)

    def dims(self, shape: Any) -> list[int]:
        key = (repr(tuple(shape)), tuple(sorted(self.bind.items())))
        found = self.shape_memo.get(key)
        if found is None:
            found = self.shape_memo[key] = super().dims(shape)
        return list(found)


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

    def set_memory_format(self, memory_format: str) -> None:
        """Hold 4-d weights (and run 4-d inputs) ``contiguous`` or ``channels_last`` (same values)."""
        layout = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}[memory_format]
        for key in self.keys.values():
            tensor = getattr(self, key)
            if tensor.dim() == 4 and tensor.layout == torch.strided:
                setattr(self, key, tensor.contiguous(memory_format=layout))
        self.memory_format = memory_format

    def install(self, node_name: str, kernel: Kernel | None) -> None:
        """Run ``node_name`` on ``kernel`` (None: back to the dense layer)."""
        key = self.kernel_of.pop(node_name, None)
        if key is not None:
            del self.kernels[key]
        if kernel is not None:
            key = _safe_key(node_name, set(self.kernels.keys()))
            self.kernels[key] = kernel
            self.kernel_of[node_name] = key

    def drop_unused_weights(self) -> None:
        """Free the dense copies of weights that only sparse kernels read (smaller file)."""
        readers: dict[str, int] = {}
        for node in self.graph.nodes:
            for p in node.params.values():
                readers[p.name] = readers.get(p.name, 0) + 1
        for node_name in self.kernel_of:
            node = self.graph.node(node_name)
            for role in ("weight", "bias"):
                p = node.params.get(role)
                if p is not None and readers.get(p.name) == 1 and p.name in self.keys:
                    delattr(self, self.keys.pop(p.name))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, key) for name, key in self.keys.items()}

    def run(self, inputs: Sequence[torch.Tensor], on_layer: LayerHook | None = None) -> list[torch.Tensor]:
        """Evaluate the graph; ``on_layer(node, args)`` sees the inputs of every conv/linear node."""
        weights = self.tensors()
        ref = next(iter(weights.values()), None)
        device = ref.device if ref is not None else (inputs[0].device if inputs else "cpu")
        it = _ModuleInterpreter(self.graph, mode="real", dtype=torch.float32, device=device, weights=weights)
        it.bind = _bindings(self.graph, inputs)
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
            for v, t in zip(node.outputs, self._evaluate(it, node, args)):
                env[v.name] = t
        return outputs

    def _evaluate(self, it: Interpreter, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
        key = self.kernel_of.get(node.name)
        if key is not None:
            return [self.kernels[key](args[0])]
        if node.kind is OpKind.CONV:
            a = node.attrs
            bias = it.weight(node.params["bias"]) if "bias" in node.params else None
            return [dense_conv(args[0], it.oi_weight(node.params["weight"]), bias, a["pads"], a["strides"], a["dilations"], a["groups"])]
        rule = rule_for(node, "real")
        if rule is None:
            raise PaicError(f"node {node.name!r} ({node.kind.value}): cannot be evaluated in torch")
        return rule(it, node, args)

    def forward(self, *inputs: torch.Tensor) -> Any:
        outs = self.run(list(inputs))
        return outs[0] if len(outs) == 1 else tuple(outs)


def _bindings(graph: Graph, inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """Symbolic input dims bound to this run's sizes."""
    bind: dict[str, int] = {}
    for v, t in zip(graph.inputs, inputs):
        for d, size in zip(v.shape or (), t.shape):
            if isinstance(d, sympy.Symbol):
                bind.setdefault(d.name, int(size))
            elif isinstance(d, str):
                bind.setdefault(d, int(size))
    return bind


def sparse_kernel(module: SparseModule, node: Node, layout: str) -> Kernel | None:
    """The sparse kernel for ``node`` in ``layout``, or None where no sparse form applies."""
    it = _ModuleInterpreter(module.graph, weights=module.tensors())
    weight = it.oi_weight(node.params["weight"])
    bias = it.weight(node.params["bias"]) if "bias" in node.params else None
    if not bool((weight != 0).any()):
        return None
    a = node.attrs
    if node.kind is OpKind.CONV:
        if weight.dim() != 4 or a["groups"] != 1:
            return None
        return SparseConv2d(weight, bias, a["pads"], a["strides"], a["dilations"], layout=layout)
    if weight.dim() != 2:
        return None
    return SparseLinear(weight, bias, alpha=a.get("alpha", 1.0), beta=a.get("beta", 1.0), layout=layout)


def _default_layouts(device: str) -> tuple[str, ...]:
    return ("csr", "bsr") if str(device).startswith("cuda") else ("csr",)


def _layer_timing(module: SparseModule, node: Node, args: list[torch.Tensor], *, device: str, repeats: int,
                  warmup: int, margin: float, layouts: Sequence[str], policy: str) -> tuple[LayerTiming, Kernel | None]:
    """Time ``node`` dense against its sparse kernels on ``args``; the row and the winning kernel."""
    it = _ModuleInterpreter(module.graph, weights=module.tensors())
    weight = it.oi_weight(node.params["weight"])
    columns = weight.shape[1] * int(np.prod(weight.shape[2:])) if weight.dim() > 1 else 1
    used = int((weight != 0).reshape(weight.shape[0], -1).any(0).sum()) if weight.dim() > 1 else 0
    kernels: dict[str, Kernel] = {}
    for layout in layouts:
        if layout_fits(layout, weight.shape[0], used):
            kernel = sparse_kernel(module, node, layout)
            if kernel is not None:
                kernels[layout] = kernel.to(weight.device)
    dense_run = lambda: module._evaluate(it, node, args)  # noqa: E731 (a closure over this layer's operands)
    candidates: dict[str, Callable[[], Any]] = {"dense": dense_run}
    candidates.update({layout: (lambda k=k: k(args[0])) for layout, k in kernels.items()})
    times = time_alternating(candidates, repeats=repeats, warmup=warmup, device=device)
    reference = dense_run()[0]
    sparse_ms: dict[str, float] = {}
    for layout, kernel in kernels.items():
        if relative_error(kernel(args[0]), reference) <= EXACT:
            sparse_ms[layout] = times[layout]
    best = min(sparse_ms, key=sparse_ms.__getitem__, default=None)
    if best is not None and policy == "sparse":
        choice, reason = best, f"policy sparse ({times['dense'] / sparse_ms[best]:.2f}x)"
    elif best is not None and policy == "auto" and sparse_ms[best] < margin * times["dense"]:
        choice, reason = best, f"{best} {times['dense'] / sparse_ms[best]:.2f}x faster than dense"
    elif best is not None:
        choice, reason = "dense", f"{best} not faster than dense ({times['dense'] / sparse_ms[best]:.2f}x)"
    else:
        choice, reason = "dense", "no sparse form (grouped, not 2-d, or empty)" if not kernels else "sparse output not exact"
    density = float((weight != 0).sum()) / max(1, weight.numel())
    row = LayerTiming(node=node.name, kind=node.kind.value, weight_shape=tuple(int(d) for d in weight.shape),
                      density=round(density, 6), columns_used=used, columns=int(columns), choice=choice,
                      dense_ms=round(times["dense"], 4), sparse_ms={k: round(v, 4) for k, v in sparse_ms.items()}, reason=reason)
    return row, kernels.get(choice)


def choose_memory_format(module: SparseModule, inputs: list[torch.Tensor], *, device: str, repeats: int,
                         warmup: int) -> tuple[str, dict[str, float]]:
    """Set ``module`` (dense) to the faster of contiguous / channels_last; both medians in ms.

    A model without 4-d convolutions stays contiguous (nothing to measure)."""
    if not any(n.kind is OpKind.CONV and len(n.params["weight"].shape) == 4 for n in module.graph.nodes):
        return "contiguous", {}
    nhwc = copy.deepcopy(module)
    nhwc.set_memory_format("channels_last")
    times = time_alternating({"contiguous": lambda: module.run(inputs), "channels_last": lambda: nhwc.run(inputs)},
                             repeats=repeats, warmup=warmup, device=device)
    del nhwc
    best = min(times, key=times.__getitem__)
    module.set_memory_format(best)
    return best, {k: round(v, 4) for k, v in times.items()}


def choose_kernels(module: SparseModule, inputs: list[torch.Tensor], *, device: str, threads: int, repeats: int,
                   warmup: int, margin: float, layouts: Sequence[str] | None = None, policy: str = "auto") -> SparseExecReport:
    """Install the faster kernel per layer in ``module``; dense everywhere unless the whole model gains."""
    report = SparseExecReport(device=str(device), batch=int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1,
                              threads=threads, repeats=repeats, warmup=warmup)
    chosen: dict[str, Kernel] = {}
    report.memory_format, report.memory_format_ms = choose_memory_format(module, inputs, device=device, repeats=repeats, warmup=warmup)

    def measure(node: Node, args: list[torch.Tensor]) -> None:
        row, kernel = _layer_timing(module, node, args, device=device, repeats=repeats, warmup=warmup, margin=margin,
                                    layouts=layouts or _default_layouts(device), policy=policy)
        report.layers.append(row)
        if kernel is not None:
            chosen[node.name] = kernel

    dense_out = module.run(inputs, on_layer=measure)
    for name, kernel in chosen.items():
        module.install(name, kernel)
    sparse_out = module.run(inputs)
    report.max_relative_error = max((relative_error(g, r) for g, r in zip(sparse_out, dense_out) if g.is_floating_point()), default=0.0)
    if report.max_relative_error > EXACT:
        raise PaicError(f"sparse execution differs from the dense model (max relative error {report.max_relative_error:.2e})")
    if not chosen:
        report.model_dense_ms = report.model_chosen_ms = time_alternating({"dense": lambda: module.run(inputs)}, repeats=repeats, warmup=warmup, device=device)["dense"]
        return report
    dense_module = _DenseView(module)
    times = time_alternating({"dense": lambda: dense_module.run(inputs), "chosen": lambda: module.run(inputs)},
                             repeats=repeats, warmup=warmup, device=device)
    report.model_dense_ms, report.model_chosen_ms = round(times["dense"], 4), round(times["chosen"], 4)
    if policy == "auto" and times["chosen"] >= margin * times["dense"]:
        for name in chosen:
            module.install(name, None)
        report.fallback = f"the sparse choice ran {times['chosen']:.3f} ms against {times['dense']:.3f} ms dense: every layer dense"
        report.model_chosen_ms = report.model_dense_ms
        report.layers = [replace(row, choice="dense", reason=row.reason + "; model-level fallback") for row in report.layers]
    return report


class _DenseView:
    """Runs a ``SparseModule`` with every layer dense (its kernels ignored), for the model-level check."""

    def __init__(self, module: SparseModule) -> None:
        self.module = module

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        saved = self.module.kernel_of
        self.module.kernel_of = {}
        try:
            return self.module.run(inputs)
        finally:
            self.module.kernel_of = saved


def build_sparse_module(graph: Graph, *, batch: int = 1, threads: int = 1, device: str = "cpu", repeats: int = 5,
                        warmup: int = 2, margin: float = 0.95, layouts: Sequence[str] | None = None, policy: str = "auto",
                        inputs: Sequence[torch.Tensor] | None = None, seed: int = 0) -> tuple[SparseModule, SparseExecReport]:
    """A ``SparseModule`` for ``graph`` with per-layer kernels chosen by timing on the target shape."""
    if threads < 1:
        raise UsageError(f"--threads must be a positive integer, got {threads}")
    if policy not in POLICIES:
        raise UsageError(f"sparse-execution policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        module = SparseModule(graph).to(device).eval()
        feed = list(inputs) if inputs is not None else example_inputs(graph, batch=batch, device=device, seed=seed)
        with torch.no_grad():
            report = choose_kernels(module, feed, device=device, threads=threads, repeats=repeats, warmup=warmup,
                                    margin=margin, layouts=layouts, policy=policy)
    finally:
        torch.set_num_threads(previous)
    module.drop_unused_weights()
    return module, report
