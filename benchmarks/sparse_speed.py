"""Latency of dense ORT / masked ORT / compact ORT / sparse-execution torch, ratio = t(dense ORT) / t(x).

For each model (ResNet-20, VGG-19 from the zoo, the tiny ViT, a BERT-like encoder built here
and exported), method and sparsity the script prunes (ERK budget + criterion, as
``benchmarks/compact_speed.py``), writes the masked ONNX model, the compact ONNX model
(``dead-node-elim``) and, per batch size, the sparse-execution torch module
(``build_sparse_module``: each conv/linear dense or sparse, chosen by timing at that batch),
checks with ``pai_compiler.bench.bench_models`` that the compact and sparse outputs (the ``.pt``
reloaded) equal the masked model's (max relative error ``<= 1e-5``), then times all four on one
input: one thread (ORT intra-op threads, ``torch.set_num_threads``), the models run alternating,
median and fastest of ``--runs`` runs after ``--warmup``. Ratios are against the dense ORT
model of the same run (median against median, fastest against fastest).

    python benchmarks/sparse_speed.py --models resnet20 --methods random-erk --sparsities 0.99 --batches 1 --runs 3
    python benchmarks/sparse_speed.py --json /tmp/sparse_speed.json --out docs/sparse_speed.md
    python benchmarks/sparse_speed.py --cases vgg19:random-erk:0.99 bert:magnitude:0.95 --batches 1 16

Writes a markdown table to ``--out`` with the command and the machine (its load included).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pai_compiler.api import compact_graph, optimize, save_model
from pai_compiler.backends.sparse_select import build_sparse_module
from pai_compiler.backends.sparse_timing import relative_error, sample_alternating, time_alternating
from pai_compiler.backends.torch_onnx import export_onnx
from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.io import atomic_write
from pai_compiler.lab import zoo
from pai_compiler.ort import session

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules

from bench_setup import export_zoo_model, machine, pipeline_for  # noqa: E402
from fast_forms import check_forms, write_compact_forms  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("resnet20", "vgg19", "tiny_vit", "bert")
METHODS = ("random-erk", "magnitude", "synflow", "dpai")
SPARSITIES = (0.9, 0.95, 0.99)


class EncoderLayer(nn.Module):
    """A BERT layer (post-norm): self-attention with explicit q/k/v/out projections, GELU FFN."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(width, width) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.ffn_in, self.ffn_out = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        split = (batch, length, self.heads, width // self.heads)
        q, k, v = (f(x).reshape(split).transpose(1, 2) for f in (self.query, self.key, self.value))
        scores = torch.softmax(q @ k.transpose(-2, -1) / (width // self.heads) ** 0.5, dim=-1)
        x = self.norm1(x + self.out((scores @ v).transpose(1, 2).reshape(batch, length, width)))
        return self.norm2(x + self.ffn_out(torch.nn.functional.gelu(self.ffn_in(x))))


class Encoder(nn.Module):
    """BERT-like encoder on embedded tokens (batch, length, width) -> pooled logits."""

    def __init__(self, width: int = 512, heads: int = 8, hidden: int = 2048, layers: int = 4, classes: int = 2) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[EncoderLayer(width, heads, hidden) for _ in range(layers)])
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x)[:, 0])


BERT_SHAPE = (128, 512)  # tokens, width


def model_path(name: str, folder: Path) -> Path:
    bundled = ROOT / "examples" / "models" / f"{name}.onnx"
    if bundled.exists():
        return bundled
    if name != "bert":
        return export_zoo_model(name, folder)

    path = folder / f"{name}.onnx"
    if not path.exists():
        torch.manual_seed(0)
        export_onnx(Encoder(), BERT_SHAPE, path)
    return path


def run_case(name: str, src: Path, method: str, sparsity: float, args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    """Prune ``src`` with ``method`` at ``sparsity``, write the masked, compact and sparse forms, check and time them."""
    graph = load_onnx_model(src)
    start = time.perf_counter()
    result = optimize(graph, pipeline=pipeline_for(method, sparsity, args.dpai_steps), seed=0)
    prune_s = time.perf_counter() - start
    stem = folder / f"{name}_{method}_{sparsity}"
    masked = Path(f"{stem}_masked.onnx")
    save_model(result, src, masked)
    # the masked model is written: compact in place (the rewrite needs everything compaction did)
    forms = write_compact_forms(result.graph, src, stem, args.batches, earlier=result.compact_report, pipeline=result.pipeline,
                                select_repeats=args.select_repeats, onnx_advice=True)
    rows = []
    for batch in args.batches:
        worst = check_forms([masked, forms.compact, forms.sparse[batch]], batch=batch)
        module = torch.load(forms.sparse[batch], weights_only=False)
        times = time_four(src, masked, forms.compact, module, batch, args.runs, args.warmup)
        report = forms.reports[batch]
        rows.append({"model": name, "method": method, "sparsity": sparsity, "batch": batch, "pipeline": result.pipeline,
                     "prune_s": round(prune_s, 2), "select_s": round(forms.select_seconds[batch], 2), **times, "max_rel_vs_masked": worst,
                     "sparse_layers": report.sparse_layers, "layers": len(report.layers), "memory_format": report.memory_format,
                     "choices": dict(Counter(layer.choice for layer in report.layers)),
                     "select_dense_ms": report.model_dense_ms, "select_chosen_ms": report.model_chosen_ms,
                     "select_ort_ms": report.onnxruntime_ms, "advice": report.advice, "forward": report.forward,
                     "forward_ms": report.forward_ms, "forward_note": report.forward_note})
        print(json.dumps(rows[-1]), flush=True)
        forms.sparse[batch].unlink()
    masked.unlink()
    forms.compact.unlink()
    return rows


def time_four(src: Path, masked: Path, compact: Path, module: Any, batch: int, runs: int, warmup: int) -> dict[str, float]:
    """Dense, masked and compact ORT and the sparse module on one input, alternating, 1 thread: each
    one's median and fastest ms (``<name>_ms``, ``<name>_fastest_ms``)."""
    sessions = {key: session(path, threads=1) for key, path in (("dense_ort", src), ("masked_ort", masked), ("compact_ort", compact))}
    first = next(iter(sessions.values())).get_inputs()[0]
    x = torch.randn([batch, *first.shape[1:]], generator=torch.Generator().manual_seed(0))
    calls: dict[str, Any] = {key: (lambda sess=sess: sess.run(None, {sess.get_inputs()[0].name: x.numpy()})) for key, sess in sessions.items()}
    calls["sparse_torch"] = lambda: module(x)
    with torch.no_grad():
        for _ in range(max(0, warmup - 2)):  # _best_and_median warms up twice itself
            for call in calls.values():
                call()
        times = _best_and_median(calls, runs)
    return {**{f"{key}_ms": round(times[f"{key}_median"], 4) for key in calls}, **{f"{key}_fastest_ms": round(times[key], 4) for key in calls}}


def odd_widths(runs: int) -> list[dict[str, Any]]:
    """Dense torch conv/linear at an odd compacted width against the aligned one (same layer otherwise)."""
    cases = [("conv3x3 32x32 b32", 29, 32), ("conv3x3 32x32 b32", 31, 32), ("conv3x3 16x16 b32", 61, 64),
             ("conv3x3 8x8 b32", 125, 128), ("conv3x3 4x4 b32", 509, 512), ("linear b64", 383, 384), ("linear b64", 1021, 1024)]
    rows = []
    for label, odd, aligned in cases:
        spatial = int(label.split()[1].split("x")[0]) if label.startswith("conv") else 0
        calls = {}
        for width in (odd, aligned):
            if spatial:
                x, w = torch.randn(32, width, spatial, spatial), torch.randn(width, width, 3, 3)
                calls[str(width)] = lambda x=x, w=w: torch.nn.functional.conv2d(x, w, padding=1)
            else:
                x, w = torch.randn(64, width), torch.randn(width, width)
                calls[str(width)] = lambda x=x, w=w: torch.nn.functional.linear(x, w)
        times = time_alternating(calls, repeats=runs, warmup=2)
        rows.append({"layer": label, "odd": odd, "aligned": aligned, "odd_ms": times[str(odd)], "aligned_ms": times[str(aligned)]})
    return rows


def _best_and_median(calls: dict[str, Any], runs: int) -> dict[str, float]:
    """Each call's fastest and median ms over ``runs`` alternating rounds (after 2 warm-up rounds).

    On a busy machine a millisecond call is either run through or preempted for a whole scheduler
    slice (several ms), so the median flips between the two; the fastest run is its own cost."""
    samples = sample_alternating(calls, repeats=runs, warmup=2)
    return {**{name: min(v) * 1e3 for name, v in samples.items()},
            **{f"{name}_median": statistics.median(v) * 1e3 for name, v in samples.items()}}


def overhead(batches: list[int], runs: int) -> list[dict[str, Any]]:
    """Per-call cost of the module itself on the dense example models: the node-by-node interpreter
    loop (the forward before the compiled plan; reached through a layer hook) against the compiled
    forward, a hand-written eager torch model of the same architecture (the zoo's) and dense ORT."""

    rows = []
    for name in ("resnet20", "tiny_vit"):
        src = ROOT / "examples" / "models" / f"{name}.onnx"
        graph = load_onnx_model(src)
        compact_graph(graph)
        eager = zoo.build(name).eval()
        sess = session(src, threads=1)
        for batch in batches:
            module, report = build_sparse_module(graph, batch=batch, threads=1, repeats=3, warmup=1, policy="dense")
            x = torch.randn([batch, *graph.inputs[0].shape[1:]])
            layout = torch.channels_last if report.memory_format == "channels_last" else torch.contiguous_format
            model = eager.to(memory_format=layout)
            feed = {sess.get_inputs()[0].name: x.numpy()}
            with torch.no_grad():
                if relative_error(module(x), module.run([x], on_layer=lambda node, args: None)[0]) > 1e-6:
                    raise SystemExit(f"{name}: the compiled forward differs from the node-by-node one")
                times = _best_and_median({"node_by_node": lambda: module.run([x], on_layer=lambda node, args: None),
                                          "compiled": lambda: module(x), "eager": lambda: model(x.contiguous(memory_format=layout)),
                                          "dense_ort": lambda: sess.run(None, feed)}, runs)
            rows.append({"model": name, "batch": batch, "nodes": len(graph.nodes), "format": report.memory_format, "runs": runs, **times})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def overhead_markdown(rows: list[dict[str, Any]]) -> list[str]:
    runs = rows[0]["runs"]
    lines = ["", "## Per-call cost of the module: node by node vs compiled forward (dense, 1 thread)", "",
             f"The example models compacted, every layer dense; the **fastest** of {runs} alternating runs, ms, in one process "
             "(on this busy machine a millisecond call is either run through or preempted for a whole scheduler slice, so "
             "medians flip between the two; the medians are in the JSON). "
             "*node by node* is the interpreter loop every call took before the compiled forward; *eager* is the zoo's "
             "hand-written `nn.Module` of the same architecture (the floor for torch), in the same memory format.", "",
             "| model | batch | nodes | node by node ms | compiled ms | **node by node / compiled** | eager ms | compiled / eager "
             "| dense ORT ms | compiled / dense ORT |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['nodes']} | {r['node_by_node']:.3f} | {r['compiled']:.3f} | "
              f"**{r['node_by_node'] / r['compiled']:.2f}×** | {r['eager']:.3f} | {r['compiled'] / r['eager']:.2f} | "
              f"{r['dense_ort']:.3f} | {r['compiled'] / r['dense_ort']:.2f} |" for r in rows]
    return lines


def _fastest_cells(row: dict[str, Any]) -> str:
    """The fastest-run columns (rows of an older JSON have none)."""
    if "sparse_torch_fastest_ms" not in row:
        return "- | - | -"
    x, y = row["dense_ort_fastest_ms"], row["sparse_torch_fastest_ms"]
    return f"{x:.2f} | {y:.2f} | **{x / y:.2f}×**"


def _kernels_cell(row: dict[str, Any]) -> str:
    """How many layers chose each kernel, e.g. ``operator 11, window 3, dense 3``."""
    counts = row.get("choices", {})
    return ", ".join(f"{name.split('/')[-1]} {n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"


def _forward_cell(row: dict[str, Any]) -> str:
    """How the module runs (plan or its TorchScript trace) and the build's medians of the candidates, e.g.
    ``traced (plan 1.31, traced 0.83, traced_dense 0.74)``; rows of an older JSON have none."""
    times = row.get("forward_ms") or {}
    detail = ", ".join(f"{name} {ms:.2f}" for name, ms in times.items())
    return f"{row.get('forward', 'plan')} ({detail})" if detail else row.get("forward", "plan")


def _advice_cell(row: dict[str, Any]) -> str:
    """What the build said about onnxruntime: 'ORT x ms' where it advised writing the .onnx instead."""
    if row.get("select_ort_ms") is None:
        return "-"
    return f"use .onnx (ORT {row['select_ort_ms']:.2f} ms)" if row.get("advice") else "keep .pt"


def _load_words(*loads: str) -> str:
    """How busy the 2 cores were, from the 1-minute load averages at the start and the end."""
    if max(float(text.split()[0]) for text in loads) < 1.5:
        return "**Quiet machine** (the run itself the main load)."
    return "**The machine was busy** (cores shared with other jobs), so absolute times are inflated and noisy."


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, str], command: str, load_start: str,
             widths: list[dict[str, Any]], overheads: list[dict[str, Any]]) -> str:
    lines = [
        "# Sparse execution: dense ORT vs masked ORT vs compact ORT vs sparse-execution torch", "",
        f"Command: `{command}`  ",
        f"Machine: {info['cpu']}, nproc={info['nproc']}, Python {info['python']}, torch {info['torch']}, onnxruntime "
        f"{info['onnxruntime']}; **1 thread** (ORT intra-op threads = 1, `torch.set_num_threads(1)`).  ",
        f"Load average at the start: {load_start}; at the end: {info['load_average']}. {_load_words(load_start, info['load_average'])} "
        "The four models of a row ran alternating, so their ratios saw the same load.  ",
        f"Latency: median (and fastest) wall time of {args.runs} runs after {args.warmup} warm-up runs, ms. × = t(dense ORT) / "
        "t(model) (> 1 is faster), median against median and fastest against fastest (on this shared machine a call is either "
        "run through or preempted for a scheduler slice: the fastest run is the model's own cost). The sparse module picked each layer's kernel by timing at the row's batch "
        f"({args.select_repeats} alternating repeats); \"sparse layers\" counts layers on a sparse kernel. Compact and sparse "
        "outputs equal the masked model's (max relative error ≤ 1e-5, checked on every row).", "",
        "| model | method | sparsity | batch | dense ORT ms | masked ORT × | compact ORT × | sparse torch ms | **sparse torch ×** "
        "| fastest: dense ORT ms | sparse torch ms | **sparse torch ×** | sparse layers | kernels | format | forward (build ms) | ORT advice |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        x = r["dense_ort_ms"]
        lines.append(f"| {r['model']} | {r['method']} | {100 * r['sparsity']:.4g}% | {r['batch']} | {x:.2f} | "
                     f"{x / r['masked_ort_ms']:.2f}× | {x / r['compact_ort_ms']:.2f}× | {r['sparse_torch_ms']:.2f} | "
                     f"**{x / r['sparse_torch_ms']:.2f}×** | {_fastest_cells(r)} | {r['sparse_layers']}/{r['layers']} | "
                     f"{_kernels_cell(r)} | {r['memory_format']} | {_forward_cell(r)} | {_advice_cell(r)} |")
    if overheads:
        lines += overhead_markdown(overheads)
    lines += ["", "## Odd compacted widths in torch (dense, 1 thread)", "",
              "Same layer at an odd width and at the next multiple of 4/8 (ms, medians of alternating runs; odd/aligned > 1 "
              "would mean the odd width loses and padding would pay):", "",
              "| layer | odd | aligned | odd ms | aligned ms | odd / aligned |", "|---|---|---|---|---|---|"]
    lines += [f"| {w['layer']} | {w['odd']} | {w['aligned']} | {w['odd_ms']:.3f} | {w['aligned_ms']:.3f} | "
              f"{w['odd_ms'] / w['aligned_ms']:.2f} |" for w in widths]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--select-repeats", type=int, default=3)
    parser.add_argument("--dpai-steps", type=int, default=20)
    parser.add_argument("--cases", nargs="+", default=None, metavar="MODEL:METHOD:SPARSITY",
                        help="exactly these rows instead of the models x methods x sparsities grid")
    parser.add_argument("--overhead-batches", nargs="*", type=int, default=[1, 16],
                        help="batches of the per-call overhead table (none: skip it)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "sparse_speed.md"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--from-json", default=None, help="re-render the markdown from a previous --json file")
    args = parser.parse_args(argv)

    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        for key in ("runs", "warmup", "select_repeats"):
            setattr(args, key, saved["args"][key])
        text = markdown(saved["rows"], args, saved["machine"], saved["command"], saved["load_start"], saved["widths"],
                        saved.get("overheads", []))
    else:
        torch.set_num_threads(1)
        load_start = " ".join(f"{v:.1f}" for v in os.getloadavg())
        command = "python benchmarks/sparse_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
        rows: list[dict[str, Any]] = []
        cases = [tuple(c.split(":")) for c in args.cases] if args.cases else [
            (name, method, str(sparsity)) for name in args.models for sparsity in args.sparsities for method in args.methods]
        with tempfile.TemporaryDirectory() as tmp:
            for name, method, sparsity in cases:
                rows += run_case(name, model_path(name, Path(tmp)), method, float(sparsity), args, Path(tmp))
        overheads = overhead(args.overhead_batches, args.runs * 3) if args.overhead_batches else []
        widths = odd_widths(args.runs)
        info = machine()
        if args.json:
            with atomic_write(args.json) as out:
                out.write_text(json.dumps({"args": vars(args), "rows": rows, "machine": info, "command": command,
                                           "load_start": load_start, "widths": widths, "overheads": overheads}, indent=2) + "\n")
        text = markdown(rows, args, info, command, load_start, widths, overheads)
    with atomic_write(args.out) as out:
        out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
