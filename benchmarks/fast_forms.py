"""The fast forms of one masked model and their latency: speed-up = t(dense ORT) / t(form), same process, alternating.

A masked graph (masks from a pass, or from a masked file's zeros) is compacted in place
(``dead-node-elim``) and written as the compact ONNX model and, per batch size, as the
sparse-execution torch module (``build_sparse_module``: each conv/linear dense or sparse,
chosen by timing at that batch). :func:`time_forms` first checks that every form's output
equals the first form's (the masked model; max relative error ``<= tolerance``), then times
the dense ONNX model and the forms with ``pai_compiler.bench.bench_models``: ``threads``
threads (ORT intra-op threads, ``torch.set_num_threads``), the models alternating, median of
``runs`` rounds after ``warmup``. Shared by ``sparse_speed.py`` and ``latency_accuracy.py``.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pai_compiler.api import compact_graph
from pai_compiler.backends.onnx_compact import write_compact_onnx
from pai_compiler.backends.sparse_select import build_sparse_module
from pai_compiler.bench import bench_models
from pai_compiler.io import save_torch_atomic

__all__ = ["CompactForms", "FormTimes", "write_compact_forms", "check_forms", "time_forms", "RUNTIME_OF_SUFFIX"]

#: the runtime that runs each form's file
RUNTIME_OF_SUFFIX = {".onnx": "onnxruntime", ".pt": "torch"}


@dataclass(frozen=True)
class CompactForms:
    """The compact ONNX model, and per batch the sparse-execution module, its kernel report and build seconds."""

    compact: Path
    sparse: dict[int, Path]
    aligned: dict[int, Path] = field(default_factory=dict)  # align -> compact ONNX model with widths multiples of it
    reports: dict[int, Any] = field(default_factory=dict)  # batch -> SparseExecReport
    select_seconds: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FormTimes:
    """Median ms of the dense model and of each form (by label), timed alternating; the worst output error."""

    batch: int
    threads: int
    runs: int
    dense_ms: float
    form_ms: dict[str, float]
    max_rel_vs_first: float

    def speedup(self, label: str) -> float:
        return self.dense_ms / self.form_ms[label]

    def fastest(self) -> str:
        """The label of the fastest form (the first listed wins a tie)."""
        return min(self.form_ms, key=lambda label: self.form_ms[label])


def write_compact_forms(graph: Any, source: Path, stem: Path, batches: Sequence[int], *, earlier: Any = None,
                        pipeline: str = "", select_repeats: int = 3, threads: int = 1, onnx_advice: bool = False,
                        aligns: Sequence[int] = ()) -> CompactForms:
    """Compact ``graph`` (read from ``source``, masks set) in place and write ``{stem}_compact.onnx`` and
    ``{stem}_b{batch}.pt`` per batch. ``earlier``: the CompactReport of dead-node-elim runs already in the
    graph's pipeline (their changes must be in the ONNX rewrite too). ``onnx_advice``: also time the compact
    ONNX model in each build (the report's ``onnxruntime_ms`` and ``advice``). ``aligns``: also write
    ``{stem}_compact_a{n}.onnx``, compacted keeping widths multiples of n (ORT's kernels dislike odd widths)."""
    aligned: dict[int, Path] = {}
    for align in aligns:
        copy = graph.clone()
        done = compact_graph(copy, align=align)
        aligned[align] = Path(f"{stem}_compact_a{align}.onnx")
        write_compact_onnx(copy, source, aligned[align], earlier.then(done) if earlier is not None else done, pipeline=pipeline)
    report = compact_graph(graph)
    report = earlier.then(report) if earlier is not None else report
    compact = Path(f"{stem}_compact.onnx")
    write_compact_onnx(graph, source, compact, report, pipeline=pipeline)
    sparse: dict[int, Path] = {}
    reports: dict[int, Any] = {}
    seconds: dict[int, float] = {}
    for batch in batches:
        start = time.perf_counter()
        twin = (lambda path: shutil.copyfile(compact, path)) if onnx_advice else None
        module, reports[batch] = build_sparse_module(graph, batch=batch, threads=threads, repeats=select_repeats, warmup=1,
                                                     onnx_twin=twin)
        seconds[batch] = time.perf_counter() - start
        sparse[batch] = Path(f"{stem}_b{batch}.pt")
        save_torch_atomic(sparse[batch], module)
    return CompactForms(compact, sparse, aligned=aligned, reports=reports, select_seconds=seconds)


def check_forms(paths: Sequence[Path], *, batch: int, threads: int = 1, tolerance: float = 1e-5) -> float:
    """The worst relative output error of ``paths[1:]`` against ``paths[0]`` at ``batch`` (raises above ``tolerance``)."""
    return _check([str(path) for path in paths], batch=batch, threads=threads, tolerance=tolerance)[0]


def _check(paths: list[str], *, batch: int, threads: int, tolerance: float) -> tuple[float, Any]:
    check = bench_models(paths, batch=batch, threads=threads, repeats=1, warmup=0)
    worst = max((row.max_rel if row.max_rel is not None else float("inf") for row in check.rows), default=0.0)
    if worst > tolerance:
        raise SystemExit(f"{paths[0]}: a form's output differs from the masked model's at batch {batch} "
                         f"(max rel {worst:.2e} > {tolerance:g}); forms: {', '.join(Path(p).name for p in paths[1:])}")
    return worst, check


def time_forms(dense: Path, forms: Mapping[str, Path], *, batch: int, threads: int = 1, runs: int = 7, warmup: int = 2,
               tolerance: float = 1e-5, budget_s: float = 0.0, max_runs: int = 200) -> FormTimes:
    """Check every form against the first one, then time ``dense`` and the forms alternating (raises on a mismatch).

    ``budget_s`` > 0 raises the rounds above ``runs`` (up to ``max_runs``) to fill about that many seconds, by the
    check pass's times: a millisecond model gets enough rounds for its median to outlast a busy machine's preemptions."""
    labels, paths = list(forms), [str(path) for path in forms.values()]
    worst, check = _check(paths, batch=batch, threads=threads, tolerance=tolerance)
    round_ms = sum(row.median_ms for row in check.rows) * (len(paths) + 1) / len(paths)  # the dense model costs about a form
    rounds = max(runs, min(max_runs, int(budget_s * 1e3 / round_ms))) if budget_s > 0 and round_ms > 0 else runs
    timed = bench_models([str(dense), *paths], batch=batch, threads=threads, repeats=rounds, warmup=warmup)
    dense_ms, *form_ms = (row.median_ms for row in timed.rows)
    return FormTimes(batch, threads, rounds, dense_ms, dict(zip(labels, form_ms)), worst)
