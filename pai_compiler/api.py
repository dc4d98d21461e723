"""Python API: load a model, build a pipeline from flags, run it, write the result.

``optimize()`` is what ``paic optimize`` runs: pipeline = allocation + criterion, e.g.
``erk{sparsity=0.95},magnitude{scope=layer}``; ``--allocation global`` gives the criterion a
global budget instead (``magnitude{sparsity=0.95}``), as the SNIP/GraSP/SynFlow papers do.
"""
from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pai_compiler.errors import UsageError
from pai_compiler.ir import Graph
from pai_compiler.pass_infra import AnalysisManager, Instrument, PassManager, PassRecord, RunContext
from pai_compiler.pipeline import format_pipeline, parse_pipeline

__all__ = ["load_model", "build_pipeline", "optimize", "OptimizeResult", "apply_exclude", "DEFAULT_METHOD", "check_device", "output_suffix", "check_output_format", "has_pass", "save_model", "compact_graph", "save_compact"]

DEFAULT_METHOD = "dpai"
ALLOCATIONS = ("erk", "uniform", "global")
# criteria whose pass takes the allocation's per-layer budget as-is (no scope option)
_LAYERWISE_ONLY = {"dpai", "npb", "random-erk"}


def load_model(spec: str | os.PathLike[str], **kwargs: Any) -> Graph:
    """Lower a model file to the IR (ONNX path; ``file.py:attr`` specs when the torch frontend is present)."""
    text = str(spec)
    if ":" in text and not Path(text).exists() and text.split(":", 1)[0].endswith(".py"):
        from pai_compiler.frontends.torch.spec import load_torch_spec  # type: ignore[import-not-found]

        return load_torch_spec(text, **kwargs)
    from pai_compiler.frontends.onnx.reader import load_onnx_model

    return load_onnx_model(text)


def build_pipeline(
    *,
    method: str = DEFAULT_METHOD,
    sparsity: float | None = None,
    allocation: str = "erk",
    pipeline: str | None = None,
    steps: int | None = None,
) -> str:
    """The pipeline string for the CLI flags (``pipeline`` wins when given)."""
    if pipeline:
        if sparsity is not None:
            raise UsageError("--sparsity does not combine with --pipeline; put it in the pipeline, e.g. 'erk{sparsity=0.95},...'")
        return format_pipeline(parse_pipeline(pipeline))
    if sparsity is None:
        raise UsageError("--sparsity is required (e.g. --sparsity 0.95) unless --pipeline is given")
    if allocation not in ALLOCATIONS:
        raise UsageError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    opts = f"steps={steps}" if steps is not None else ""
    if steps is not None and method != "dpai":
        raise UsageError("--steps applies to --method dpai only")
    if allocation == "global":
        if method in _LAYERWISE_ONLY:
            raise UsageError(f"--method {method} needs a per-layer allocation (--allocation erk or uniform)")
        text = f"{method}{{sparsity={sparsity!r}{_global_scope(method)}}}"
    else:
        criterion = method if method in _LAYERWISE_ONLY else f"{method}{{scope=layer}}"
        if opts:
            criterion = f"{method}{{{opts}}}"
        text = f"{allocation}{{sparsity={sparsity!r}}},{criterion}"
    return format_pipeline(parse_pipeline(text))


def _global_scope(method: str) -> str:
    """``,scope=global`` for a criterion whose scope defaults to per-layer (``random``), else nothing."""
    import dataclasses

    from pai_compiler.registry import get_pass_class

    cls = get_pass_class(method)
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    return ",scope=global" if "scope" in fields and fields["scope"].default != "global" else ""


def has_pass(pipeline: str, name: str) -> bool:
    """Whether the pipeline string runs the pass ``name``."""
    return any(p.name == name for p in parse_pipeline(pipeline))


def check_device(device: str) -> None:
    """``cpu``, ``cuda`` or ``cuda:N`` of a GPU torch can see; anything else is a usage error, raised before any work."""
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device == "cpu":
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.split(":")[1]) if ":" in device else 0
    if count == 0:
        raise UsageError(f"--device {device}: torch {torch.__version__} sees no CUDA device; use --device cpu")
    if index >= count:
        raise UsageError(f"--device {device}: torch sees {count} CUDA device(s) (cuda:0..cuda:{count - 1})")


def output_suffix(out: str | os.PathLike[str]) -> str:
    """``.onnx`` or ``.pt`` (``.pth`` reads as ``.pt``); any other suffix is a usage error."""
    suffix = Path(out).suffix.lower()
    if suffix not in (".onnx", ".pt", ".pth"):
        raise UsageError(f"unknown output format {suffix or '(none)'!r} for {out}: use .onnx or .pt")
    return ".pt" if suffix == ".pth" else suffix


def check_output_format(out: str | os.PathLike[str], *, torch_source: bool, compact: bool = False) -> None:
    """Refuse an output the backends can't write, before any work: .onnx or .pt; a masked .pt needs a torch model."""
    suffix = output_suffix(out)
    if suffix != ".onnx" and not torch_source and not compact:
        raise UsageError(f"-o {out}: a masked .pt needs a PyTorch model (file.py:attr); write an ONNX model as .onnx "
                         "(or add --compact for a torch module)")
    if suffix == ".onnx" and torch_source and compact:
        raise UsageError(f"-o {out}: --compact writes a PyTorch model as .pt (the compact ONNX writer rewrites an ONNX source)")


def apply_exclude(graph: Graph, patterns: Sequence[str]) -> list[str]:
    """Keep layers whose weight name matches any glob dense (not prunable); return their names."""
    excluded = []
    matched: set[str] = set()
    for p in graph.prunable_params():
        names = [n for n in (p.name, p.origin, *[u.name for u in graph.param_users(p)]) if n]
        hits = {pat for pat in patterns if any(fnmatch.fnmatchcase(n, pat) for n in names)}
        if hits:
            graph.set_prunable(p, False)
            excluded.append(p.name)
            matched |= hits
    if patterns and not excluded:
        raise UsageError(f"--exclude {', '.join(patterns)} matches no prunable layer")
    unmatched = [pat for pat in patterns if pat not in matched]
    if unmatched:
        graph.meta["warnings"].append(f"--exclude pattern(s) {', '.join(unmatched)} matched no prunable layer")
    return excluded


@dataclass
class OptimizeResult:
    graph: Graph
    pipeline: str
    records: list[PassRecord]
    excluded: list[str] = field(default_factory=list)

    @property
    def masks(self) -> dict[str, Any]:
        return {p.origin or p.name: p.mask_or_ones() for p in self.graph.prunable_params()}


def optimize(
    model: str | os.PathLike[str] | Graph,
    *,
    sparsity: float | None = None,
    method: str = DEFAULT_METHOD,
    allocation: str = "erk",
    pipeline: str | None = None,
    seed: int = 0,
    steps: int | None = None,
    exclude: Sequence[str] = (),
    device: str = "cpu",
    data: Any = None,
    progress: bool = False,
    instruments: Sequence[Instrument] = (),
) -> OptimizeResult:
    """Prune ``model`` (a path or an IR Graph, which is modified) and return the result."""
    check_device(device)
    spec = build_pipeline(method=method, sparsity=sparsity, allocation=allocation, pipeline=pipeline, steps=steps)
    graph = model if isinstance(model, Graph) else load_model(model)
    excluded = apply_exclude(graph, exclude)
    if not graph.prunable_params():
        graph.meta["warnings"].append("the model has no prunable (conv/linear) weights: nothing to prune, written unchanged")
        graph.meta["pipeline"] = spec
        return OptimizeResult(graph, spec, [], excluded)
    context = RunContext(seed=seed, device=device, progress=progress, data=data)
    am = AnalysisManager(graph, context)
    records = PassManager(parse_pipeline(spec), instruments=instruments).run(graph, am)
    unmasked = [p.name for p in graph.prunable_params() if p.mask is None]
    if unmasked and len(unmasked) == len(graph.prunable_params()):
        raise UsageError(f"pipeline '{spec}' produced no masks: add a criterion (e.g. ',magnitude{{scope=layer}}')")
    graph.meta["pipeline"] = spec
    return OptimizeResult(graph, spec, records, excluded)


def save_model(result: OptimizeResult, source: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Write the pruned model; the format follows ``out``'s suffix (.onnx, or .pt with the torch backend)."""
    if result.graph.meta.get("compact"):  # dead-node-elim ran (e.g. in --pipeline): layers changed shape
        save_compact(result.graph, source, out, pipeline=result.pipeline)
        return
    if output_suffix(out) == ".onnx":
        if result.graph.meta.get("source_format") == "onnx":
            from pai_compiler.backends.onnx_masked import write_masked_onnx

            write_masked_onnx(result.graph, source, out, pipeline=result.pipeline)
            return
        from pai_compiler.backends.torch_backend import write_torch_onnx  # type: ignore[import-not-found]

        write_torch_onnx(result, out)
        return
    from pai_compiler.backends.torch_backend import write_pt  # type: ignore[import-not-found]

    write_pt(result, source, out)


def compact_graph(graph: Graph, *, align: int = 1, instruments: Sequence[Instrument] = ()) -> list[PassRecord]:
    """Run ``dead-node-elim`` on ``graph`` in place: dead channels removed, function unchanged.

    ``align`` > 1 keeps a few dead channels so conv/linear widths stay multiples of it (faster
    kernels in ONNX Runtime; exact all the same)."""
    from pai_compiler.passes.transform.dead_node_elim import DeadNodeElimPass

    if align < 1:
        raise UsageError(f"--align must be a positive integer, got {align}")
    return PassManager([DeadNodeElimPass(align=align)], instruments=instruments).run(graph)


def save_compact(graph: Graph, source: str | os.PathLike[str], out: str | os.PathLike[str], *, pipeline: str = "",
                 batch: int = 1, threads: int = 1, device: str = "cpu") -> dict[str, Any] | None:
    """Write a compacted graph: .onnx rewrites the source ONNX model; .pt saves a torch SparseModule
    whose conv/linear layers run dense or sparse, whichever was faster at ``batch``/``threads`` on
    ``device`` (returns that choice, the ``sparse_exec`` report block; None for .onnx)."""
    if output_suffix(out) == ".onnx":
        from pai_compiler.backends.onnx_compact import write_compact_onnx

        write_compact_onnx(graph, source, out, pipeline=pipeline)
        return None
    from pai_compiler.backends.sparse_select import build_sparse_module
    from pai_compiler.io import save_torch_atomic

    module, report = build_sparse_module(graph, batch=batch, threads=threads, device=device)
    save_torch_atomic(out, module)
    return report.to_dict()
