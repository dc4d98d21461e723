"""Choosing each layer's kernel by measurement: the fastest of ``t_dense`` and each ``t_sparse`` on the target shape.

``build_sparse_module(graph)`` makes a :class:`~pai_compiler.backends.torch_sparse.SparseModule`
(BatchNorms folded into their convs), picks the faster memory format of the dense model
(contiguous or channels_last), then times every conv and every linear layer dense against its
sparse kernels on the activations the layer really sees at ``batch`` with ``threads`` threads
(the fastest of ``repeats`` alternating runs after ``warmup`` runs: a layer's own cost on a busy
machine). The sparse kernels are CSR (on CUDA also BSR) products: a groups=1 2-D conv's used
taps read by index, by copy or by window, any conv as one matrix on the flattened input
(``operator``), a linear layer over its used input features; a 2-D conv also runs unpacked
(``plain`` ``F.conv2d``, which beats oneDNN's fixed cost per call on tiny layers).
``policy="auto"`` keeps a sparse kernel only when ``t_sparse < margin * t_dense`` and its output
equals the dense one (max relative error ``<= EXACT``); then the whole model is timed dense,
with the choice, and with the choice in the other memory format (medians, alternating), and if
neither choice is faster every layer goes back to dense — the auto choice is never slower than
the compact dense model. ``policy="sparse"`` installs every exact sparse kernel (tests,
experiments), ``policy="dense"`` none. Last, :func:`~pai_compiler.backends.sparse_forward.choose_forward`
times the plan against its TorchScript trace (and the traced dense model): a trace runs the
module's calls only where it equals the masked model and is faster (``forward`` in the report). Given ``onnx_twin`` (a writer of the same compact model
as ONNX) and onnxruntime, the finished module is also timed against the compact ONNX model in
onnxruntime (alternating, same feed and threads): where that is faster, the report's
``advice`` says so in one line, both times and the ``.onnx`` file to write instead, with
``--align auto`` (:mod:`pai_compiler.align_choice`: aligned widths and the masked model are
timed too, so what it writes is at least as fast as the compact model timed here).
"""
from __future__ import annotations

import copy
import importlib.util
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pai_compiler.backends.sparse_fusion import fuse_for_inference
from pai_compiler.backends.sparse_kernels import GATHERS, PackedConv2d, layout_fits
from pai_compiler.backends.sparse_timing import PLAIN, LayerTiming, SparseExecReport, example_inputs, relative_error, time_alternating
from pai_compiler.backends.sparse_forward import back_to_dense, choose_forward
from pai_compiler.backends.torch_sparse import OPERATOR, Kernel, SparseModule, sparse_kernel
from pai_compiler.errors import PaicError, UsageError
from pai_compiler.interp import Interpreter
from pai_compiler.ir import Graph, Node, OpKind
from pai_compiler.ort import session
from pai_compiler.progress import MetricUpdate, metric_bar

OnnxWriter = Callable[[Path], None]

__all__ = ["build_sparse_module", "choose_kernels", "choose_memory_format", "compare_with_onnxruntime", "EXACT", "POLICIES", "OnnxWriter"]

#: auto: the faster per layer, never slower as a model; sparse: every layer with a sparse form
#: (exactness tests, experiments); dense: none (the compact model in torch)
POLICIES = ("auto", "sparse", "dense")
#: the largest relative error a sparse kernel may have against the dense layer
EXACT = 1e-5
#: onnxruntime's fused kernels round differently: the agreement its timing needs to count
ORT_AGREE = 1e-4


def _default_layouts(device: str) -> tuple[str, ...]:
    return ("csr", "bsr") if str(device).startswith("cuda") else ("csr",)


def _layer_timing(module: SparseModule, node: Node, args: list[torch.Tensor], *, device: str, repeats: int,
                  warmup: int, margin: float, layouts: Sequence[str], policy: str) -> tuple[LayerTiming, Kernel | None]:
    """Time ``node`` dense against its sparse kernels on ``args``; the row and the winning kernel."""
    it = module.interpreter()
    weight = it.oi_weight(node.params["weight"])
    columns = weight.shape[1] * int(np.prod(weight.shape[2:])) if weight.dim() > 1 else 1
    used = int((weight != 0).reshape(weight.shape[0], -1).any(0).sum()) if weight.dim() > 1 else 0
    kernels: dict[str, Kernel] = {}
    for layout in layouts:
        for gather in (*GATHERS, OPERATOR) if node.kind is OpKind.CONV else GATHERS[:1]:
            fits = gather == OPERATOR or layout_fits(layout, weight.shape[0], used)
            kernel = sparse_kernel(module, node, layout, gather, in_shape=tuple(args[0].shape)) if fits else None
            if kernel is not None:
                kernels[f"{layout}/{gather}" if node.kind is OpKind.CONV else layout] = kernel.to(weight.device)
    if node.kind is OpKind.CONV and weight.dim() == 4:  # the dense conv unpacked, as a "sparse" kernel: model-level fallback covers it
        a = node.attrs
        kernels[PLAIN] = PackedConv2d(weight, module.conv_bias(it, node), a["pads"], a["strides"], a["dilations"], a["groups"], packed=False)
    dense_run = lambda: module.evaluate(it, node, args)  # noqa: E731 (a closure over this layer's operands)
    candidates: dict[str, Callable[[], Any]] = {"dense": dense_run}
    relu = node.name in module.fused_relu  # the dense kernel applies it: so must the sparse one

    def sparse_run(kernel: Kernel) -> torch.Tensor:
        out = kernel(args[0])
        return torch.relu_(out) if relu else out

    candidates.update({name: (lambda k=k: sparse_run(k)) for name, k in kernels.items()})
    times = time_alternating(candidates, repeats=repeats, warmup=warmup, device=device, statistic="min")
    reference = dense_run()[0]
    sparse_ms: dict[str, float] = {}
    for layout, kernel in kernels.items():
        if relative_error(sparse_run(kernel), reference) <= EXACT:
            sparse_ms[layout] = times[layout]
    eligible = [name for name in sparse_ms if policy == "auto" or name != PLAIN]  # policy sparse: sparse kernels only
    best = min(eligible, key=sparse_ms.__getitem__, default=None)
    if policy == "dense":
        choice, reason = "dense", "policy dense"
    elif best is not None and policy == "sparse":
        choice, reason = best, f"policy sparse ({times['dense'] / sparse_ms[best]:.2f}x)"
    elif best is not None and policy == "auto" and sparse_ms[best] < margin * times["dense"]:
        choice, reason = best, f"{best} {times['dense'] / sparse_ms[best]:.2f}x faster than dense"
    elif best is not None:
        choice, reason = "dense", f"{best} not faster than dense ({times['dense'] / sparse_ms[best]:.2f}x)"
    else:
        choice, reason = "dense", "no sparse form (empty, too big a matrix, or not 2-d)" if set(kernels) <= {PLAIN} else "sparse output not exact"
    density = float((weight != 0).sum()) / max(1, weight.numel())
    row = LayerTiming(node=node.name, kind=node.kind.value, weight_shape=tuple(int(d) for d in weight.shape),
                      density=round(density, 6), columns_used=used, columns=int(columns), choice=choice,
                      dense_ms=round(times["dense"], 4), sparse_ms={k: round(v, 4) for k, v in sparse_ms.items()}, reason=reason)
    return row, kernels.get(choice)


def _has_2d_conv(graph: Graph) -> bool:
    """Whether some conv is 2-D (4-d weight): only then can the memory format matter."""
    return any(n.kind is OpKind.CONV and len(n.params["weight"].shape) == 4 for n in graph.nodes)


def choose_memory_format(module: SparseModule, inputs: list[torch.Tensor], *, device: str, repeats: int,
                         warmup: int) -> tuple[str, dict[str, float]]:
    """Set ``module`` (dense) to the faster of contiguous / channels_last; both medians in ms.

    A model without 4-d convolutions stays contiguous (nothing to measure)."""
    if not _has_2d_conv(module.graph):
        return "contiguous", {}
    nhwc = copy.deepcopy(module)
    nhwc.set_memory_format("channels_last")
    times = time_alternating({"contiguous": lambda: module.run(inputs), "channels_last": lambda: nhwc.run(inputs)},
                             repeats=repeats, warmup=warmup, device=device)
    del nhwc
    best = min(times, key=times.__getitem__)
    module.set_memory_format(best)
    return best, {k: round(v, 4) for k, v in times.items()}


def choose_kernels(module: SparseModule, inputs: list[torch.Tensor], *, reference: list[torch.Tensor], device: str, threads: int, repeats: int,
                   warmup: int, margin: float, layouts: Sequence[str] | None = None, policy: str = "auto",
                   bar: MetricUpdate | None = None) -> SparseExecReport:
    """Install the faster kernel per layer in ``module``; dense everywhere unless the whole model gains.
    ``bar(layers timed, text)`` hears each layer's pick (between timings, never during one)."""
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
        if bar is not None:
            bar(len(report.layers), f"{node.name} -> {row.choice} · {len(chosen)} sparse")

    dense_out = module.run(inputs, on_layer=measure)
    for name, kernel in chosen.items():
        module.install(name, kernel)
    sparse_out = module.run(inputs)
    report.max_relative_error = max((relative_error(got, ref) for outs in (sparse_out, dense_out) for got, ref in zip(outs, reference)
                                     if got.is_floating_point()), default=0.0)
    if report.max_relative_error > EXACT:
        raise PaicError(f"sparse execution differs from the masked model (max relative error {report.max_relative_error:.2e})")
    if not chosen:
        report.model_dense_ms = report.model_chosen_ms = time_alternating({"dense": lambda: module.run(inputs)}, repeats=repeats, warmup=warmup, device=device)["dense"]
        return report
    _settle(module, inputs, list(chosen), report, device=device, repeats=repeats, warmup=warmup, margin=margin, policy=policy)
    return report


def _settle(module: SparseModule, inputs: list[torch.Tensor], chosen: list[str], report: SparseExecReport, *, device: str,
            repeats: int, warmup: int, margin: float, policy: str) -> None:
    """Time the whole model dense, with the chosen kernels, and with them in the other memory format
    (a sparse kernel's output is contiguous: next to it, the dense layers' best format may change);
    keep the fastest, and under ``policy="auto"`` go back to dense unless it beats dense by ``margin``."""
    dense_format = report.memory_format
    other = "contiguous" if dense_format == "channels_last" else "channels_last"
    twin = module.format_twin(other) if _has_2d_conv(module.graph) else None
    candidates = {"dense": lambda: module.run(inputs, sparse=False), "chosen": lambda: module.run(inputs)}
    if twin is not None:
        candidates["other"] = lambda: twin.run(inputs)
    times = time_alternating(candidates, repeats=repeats, warmup=warmup, device=device)
    del twin
    if times.get("other", math.inf) < times["chosen"]:
        module.set_memory_format(other)
        report.memory_format, times["chosen"] = other, times["other"]
    report.model_dense_ms, report.model_chosen_ms = round(times["dense"], 4), round(times["chosen"], 4)
    if policy == "auto" and times["chosen"] >= margin * times["dense"]:
        if report.memory_format != dense_format:
            module.set_memory_format(dense_format)
            report.memory_format = dense_format
        back_to_dense(module, report, f"the sparse choice ran {times['chosen']:.3f} ms against {times['dense']:.3f} ms dense: every layer dense")
        report.model_chosen_ms = report.model_dense_ms


def build_sparse_module(graph: Graph, *, batch: int = 1, threads: int = 1, device: str = "cpu", repeats: int = 5,
                        warmup: int = 2, margin: float = 0.95, layouts: Sequence[str] | None = None, policy: str = "auto",
                        inputs: Sequence[torch.Tensor] | None = None, seed: int = 0, onnx_twin: OnnxWriter | None = None,
                        onnx_name: str = "SMALL.onnx", progress: bool = False,
                        input_shape: Sequence[int] | None = None) -> tuple[SparseModule, SparseExecReport]:
    """A ``SparseModule`` for ``graph`` with per-layer kernels chosen by timing on the target shape.

    ``onnx_twin(path)`` writes the same compact model as ONNX: it is then timed in onnxruntime
    against the module (see :func:`compare_with_onnxruntime`; ``onnx_name`` is the file the
    advice tells the user to write). ``progress``: a bar over the timed layers on stderr
    (terminals only; redrawn between timings, no refresh thread). ``input_shape``: the first
    input's full shape, binding its symbolic dims (see :func:`example_inputs`)."""
    if threads < 1:
        raise UsageError(f"--threads must be a positive integer, got {threads}")
    if policy not in POLICIES:
        raise UsageError(f"sparse-execution policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        module = SparseModule(graph)
        fuse_for_inference(module)
        module = module.to(device).eval()
        feed = list(inputs) if inputs is not None else example_inputs(graph, batch=batch, device=device, seed=seed, shape=input_shape)
        with torch.no_grad():  # the IR's own semantics: what every fusion and kernel must reproduce
            reference = Interpreter(graph, device=device).run(feed, keep_values=False).outputs
        layers = sum(1 for node in graph.nodes if node.kind in (OpKind.CONV, OpKind.LINEAR))
        with torch.no_grad(), metric_bar(progress, "[bold]sparse kernels[/]", layers + 1, unit="layers", timed=True) as bar:
            report = choose_kernels(module, feed, reference=reference, device=device, threads=threads, repeats=repeats, warmup=warmup,
                                    margin=margin, layouts=layouts, policy=policy, bar=bar)
            choose_forward(module, feed, report, reference=reference, exact=EXACT, policy=policy, margin=margin)
            if bar is not None:
                bar(layers, f"{report.sparse_layers} sparse · timing the model" + (" against onnxruntime" if onnx_twin else ""))
            if onnx_twin is not None:
                compare_with_onnxruntime(module, feed, report, onnx_twin, onnx_name=onnx_name)
            else:
                report.onnxruntime_note = "no compact ONNX model to compare with (the source is not ONNX)"
            if bar is not None:
                bar(layers + 1, f"{report.sparse_layers} sparse of {layers} · {report.model_chosen_ms:.3f} ms vs {report.model_dense_ms:.3f} dense")
    finally:
        torch.set_num_threads(previous)
    module.drop_unused_weights()
    return module, report


def _onnxruntime_missing(device: str) -> str:
    """Why onnxruntime cannot be compared here ("" when it can)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed: the compact ONNX model was not timed"
    if str(device) != "cpu":
        return f"the compact ONNX model is timed on cpu only (the module runs on {device})"
    return ""


def compare_with_onnxruntime(module: SparseModule, inputs: list[torch.Tensor], report: SparseExecReport, onnx_twin: OnnxWriter, *,
                             onnx_name: str) -> None:
    """Time the compact ONNX model (written by ``onnx_twin``) in onnxruntime against ``module``,
    alternating, same feed and thread count; fill ``report.onnxruntime_ms`` and, where
    onnxruntime is faster (and agrees with the module), the one-line ``report.advice``."""
    report.onnxruntime_note = _onnxruntime_missing(report.device)
    if report.onnxruntime_note:
        return
    with tempfile.TemporaryDirectory(prefix="paic-ort-") as scratch:
        path = Path(scratch) / "compact.onnx"
        onnx_twin(path)
        sess = session(path, device="cpu", threads=report.threads)
        names = [i.name for i in sess.get_inputs()]
        feed = {name: t.detach().cpu().numpy() for name, t in zip(names, inputs)}
        times = time_alternating({"torch": lambda: module.run(inputs), "onnxruntime": lambda: sess.run(None, feed)},
                                 repeats=report.repeats, warmup=report.warmup, device=report.device)
        ort_out = sess.run(None, feed)
    error = max((relative_error(torch.from_numpy(got), ref.cpu()) for got, ref in zip(ort_out, module.run(inputs))
                 if ref.is_floating_point()), default=0.0)
    report.onnxruntime_ms = round(times["onnxruntime"], 4)
    if error > ORT_AGREE:
        report.onnxruntime_note = f"onnxruntime's output differs from the module's (max relative error {error:.1e}): no advice"
        return
    torch_ms = times["torch"]
    if times["onnxruntime"] < torch_ms:
        report.advice = (f"onnxruntime runs the compact ONNX model faster: {times['onnxruntime']:.3f} ms against {torch_ms:.3f} ms for "
                         f"this torch module (batch {report.batch}, {report.threads} thread(s)); write it with -o {onnx_name} --align auto "
                         f"(which also times widths aligned to 4 and 8 and the masked model, and writes the fastest)")
