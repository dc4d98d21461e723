"""``--align auto``: write the fastest of the compact candidates and the masked model in onnxruntime.

Each candidate alignment N (``ALIGN_CANDIDATES``) compacts a fresh copy of the sparse model with
``dead-node-elim{align=N}`` into a temporary file beside the output; the masked model and every
candidate then run alternating (``pai_compiler.bench.bench_models``: same input, median ms).
A candidate must be exact against the masked model (max rel = max|y - y0| / max|y0| <= 1e-5,
as for the sparse ``.pt`` route). The fastest candidate is written when its median beats the
masked model's; otherwise the masked model is written unchanged ("stays dense": it is exact).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pai_compiler import api
from pai_compiler.audit import masks_from_zeros
from pai_compiler.backends.onnx_compact import write_compact_onnx
from pai_compiler.bench import BenchResult, bench_models
from pai_compiler.errors import ModelError, PaicError
from pai_compiler.io import atomic_write
from pai_compiler.progress import PHASE_DELAY, metric_bar

__all__ = ["ALIGN_CANDIDATES", "EXACT_REL", "AlignCandidate", "AlignChoice", "choose_align", "choice_line", "masked_temp"]

#: the alignments tried by ``--align auto`` (1: no dead channel kept; 4, 8: ORT's SIMD block widths).
#: 16 was measured too (ResNet-20, 99 % SynFlow and DPaI masks, batch 1 and 8, 1 thread): always
#: ~1.5x slower than align 1, so it is not tried; 4 or 1 won, 8 was within noise of 4.
ALIGN_CANDIDATES = (1, 4, 8)
#: largest max_rel a compact candidate may differ from the masked model by
EXACT_REL = 1e-5


@dataclass(frozen=True)
class AlignCandidate:
    """One compact candidate: its alignment, prunable parameters, median ms and error against the masked model."""

    align: int
    params: int
    median_ms: float
    max_rel: float


@dataclass(frozen=True)
class AlignChoice:
    """The timed candidates, the masked model's median, and what was written (``chosen``: an align, or None = masked)."""

    candidates: tuple[AlignCandidate, ...]
    masked_ms: float
    chosen: int | None
    batch: int
    threads: int
    runtime: str
    repeats: int
    warmup: int

    def to_dict(self) -> dict[str, Any]:
        """The report's ``align_choice`` block."""
        return {"candidates": [asdict(c) for c in self.candidates], "masked_ms": self.masked_ms,
                "chosen": "masked" if self.chosen is None else self.chosen, "batch": self.batch, "threads": self.threads,
                "runtime": self.runtime, "repeats": self.repeats, "warmup": self.warmup, "max_rel_allowed": EXACT_REL}



def choice_line(doc: dict[str, Any]) -> str:
    """One line from an ``align_choice`` block: what was written and why."""
    timed = ", ".join(f"align {c['align']} {c['median_ms']:.3f} ms" for c in doc["candidates"])
    where = f"onnxruntime, batch {doc['batch']}, {doc['threads']} thread(s), median of {doc['repeats']} alternating"
    if doc["chosen"] == "masked":
        return (f"align auto: the masked model ({doc['masked_ms']:.3f} ms) was faster than every compact candidate "
                f"({timed}; {where}): wrote it unchanged (stays dense)")
    best = next(c for c in doc["candidates"] if c["align"] == doc["chosen"])
    speedup = doc["masked_ms"] / best["median_ms"] if best["median_ms"] > 0 else float("inf")
    return (f"align auto: chose align {doc['chosen']}, {speedup:.2f}x the masked model's {doc['masked_ms']:.3f} ms "
            f"({timed}; {where})")


def _compact_candidate(source: str, path: Path, align: int, pipeline: str) -> int:
    """Compact a fresh copy of ``source`` at ``align`` into ``path``; returns its parameter count."""
    graph = api.load_model(source)
    masks_from_zeros(graph)
    report = api.compact_graph(graph, align=align)
    write_compact_onnx(graph, source, path, report, pipeline=pipeline)
    return sum(p.numel for p in graph.prunable_params())


def _write_masked(source: str, out: Path) -> None:
    """The masked model unchanged at ``out`` (atomically; with its external-data file if it has one)."""
    import onnx  # heavy optional dependency, only to re-save a model whose weights live outside the file

    model = onnx.load(source, load_external_data=False)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    with atomic_write(out) as tmp:
        if external:
            from pai_compiler.onnx_wire import load_full_model

            onnx.save_model(load_full_model(source), str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=out.name + ".data", size_threshold=1024)
        else:
            shutil.copyfile(source, tmp)


def _remove(path: Path) -> None:
    for leftover in (path, path.with_name(path.name + ".data")):
        leftover.unlink(missing_ok=True)


def _temp_beside(out: Path, tag: str) -> Path:
    """A new empty ``.onnx`` file beside ``out`` (so candidates land on the output's file system)."""
    handle, name = tempfile.mkstemp(dir=out.parent if str(out.parent) else Path("."), prefix=f".{out.stem}.{tag}.", suffix=".onnx")
    os.close(handle)
    return Path(name)


@contextlib.contextmanager
def masked_temp(out: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``out`` for the masked model that ``choose_align`` reads; removed afterwards."""
    path = _temp_beside(Path(out), "masked")
    try:
        yield path
    finally:
        _remove(path)


def _timed(models: list[str], *, batch: int, threads: int, repeats: int, warmup: int, progress: bool,
           input_shape: tuple[int, ...] | None) -> BenchResult:
    """``bench_models``; an input it cannot make up (a symbolic dim past the batch) is an error naming the fix."""
    try:
        shape = None if input_shape is None else ",".join(map(str, input_shape))
        return bench_models(models, batch=None if input_shape else batch, threads=threads, input_shape=shape, repeats=repeats,
                            warmup=warmup, progress=progress, label="align auto: timing")
    except ModelError as exc:
        reason = str(exc).split("; pass --input-shape")[0]
        raise ModelError(f"--align auto cannot time the candidates: {reason}; pass --input-shape (the first input's full "
                         "shape, batch first, e.g. 1,128) or give a fixed --align N (e.g. 4, or 1)") from None


def choose_align(source: str | os.PathLike[str], out: str | os.PathLike[str], *, batch: int = 1, threads: int = 1,
                 repeats: int = 10, warmup: int = 3, candidates: Sequence[int] = ALIGN_CANDIDATES,
                 pipeline: str = "", progress: bool = False, input_shape: tuple[int, ...] | None = None) -> AlignChoice:
    """Compact the sparse ONNX ``source`` at every candidate alignment, time them and ``source`` alternating in
    onnxruntime, and write the fastest (a compact candidate, or ``source`` unchanged) to ``out`` atomically.
    ``progress``: a bar over the candidates compacted, then one over the timing rounds (stderr, terminals only).
    ``input_shape``: the first input's full shape to time at (``paic bench --input-shape``)."""
    source, out = os.fspath(source), Path(out)
    temps: dict[int, Path] = {}
    params: dict[int, int] = {}
    try:
        aligns = list(dict.fromkeys(candidates))
        with metric_bar(progress, "[bold]align auto[/]", len(aligns), unit="candidates", delay=PHASE_DELAY) as bar:
            for done, align in enumerate(aligns, 1):
                temps[align] = _temp_beside(out, f"align{align}")
                params[align] = _compact_candidate(source, temps[align], align, pipeline)
                if bar is not None:
                    bar(done, " · ".join(f"align {a}: {n:,} params" for a, n in params.items()))
        result = _timed([source, *map(str, temps.values())], batch=batch, threads=threads, repeats=repeats, warmup=warmup,
                        progress=progress, input_shape=input_shape)
        masked_row, *rows = result.rows
        timed = tuple(AlignCandidate(align, params[align], row.median_ms, row.max_rel if row.max_rel is not None else float("inf"))
                      for align, row in zip(temps, rows))
        for candidate in timed:
            if not candidate.max_rel <= EXACT_REL:
                raise PaicError(f"--align auto: the compact candidate at align {candidate.align} differs from the masked model "
                                f"(max relative error {candidate.max_rel:.2e} > {EXACT_REL:g}); use --align 1 and report the model")
        best = min(timed, key=lambda c: (c.median_ms, c.align))
        chosen = best.align if best.median_ms < masked_row.median_ms else None
        if chosen is None:
            _write_masked(source, out)
        elif (temps[chosen].with_name(temps[chosen].name + ".data")).exists():
            _compact_candidate(source, out, chosen, pipeline)  # its weights file is named after the output
        else:
            os.replace(temps[chosen], out)
    finally:
        for path in temps.values():
            _remove(path)
    return AlignChoice(candidates=timed, masked_ms=masked_row.median_ms, chosen=chosen, batch=result.batch,
                       threads=result.threads, runtime="onnxruntime", repeats=repeats, warmup=warmup)
