"""Python API: load a model, build the passes from flags, run them, write the result.

``optimize()`` is what ``paic optimize`` runs: passes = allocation + criterion, e.g.
``erk{sparsity=0.95},magnitude{scope=layer}``; ``--allocation global`` gives the criterion a
global budget instead (``magnitude{sparsity=0.95}``), as the SNIP/GraSP/SynFlow papers do.
"""
from __future__ import annotations

import fnmatch
import numbers
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pai_compiler.backends.onnx_masked import write_masked_onnx
from pai_compiler.errors import UsageError
from pai_compiler.frontends.onnx.reader import StaticDims, load_onnx_model
from pai_compiler.ir import Graph
from pai_compiler.pass_infra import AnalysisManager, Instrument, Pass, PassManager, PassRecord, RunContext
from pai_compiler.passes.allocation.base import Allocation
from pai_compiler.passes.transform.dead_node_elim import CompactReport, DeadNodeElimPass, compact_report_of
from pai_compiler.pipeline import format_pipeline, make_pass, parse_pipeline, pass_options
from pai_compiler.registry import get_pass_class

__all__ = ["load_model", "build_passes", "optimize", "OptimizeResult", "apply_exclude", "Exclusion", "DEFAULT_METHOD", "check_device", "check_align",
           "output_suffix", "check_output_format", "has_pass", "save_model", "compact_graph", "save_compact"]

ReportT = TypeVar("ReportT")

DEFAULT_METHOD = "dpai"
ALLOCATIONS = ("erk", "uniform", "global")
# criteria whose pass takes the allocation's per-layer budget as-is (no scope option)
_LAYERWISE_ONLY = {"dpai", "npb", "random-erk"}


def load_model(spec: str | os.PathLike[str], *, static_dims: StaticDims = None, progress: bool = False, **kwargs: Any) -> Graph:
    """Lower a model file to the IR (ONNX path; ``file.py:attr`` specs when the torch frontend is present).

    ``static_dims`` binds an ONNX file's symbolic dims at load (:func:`load_onnx_model`); a
    PyTorch spec's shapes come from ``input_shape`` instead, so it is not used there.
    ``progress``: a long load shows its phases on a bar (stderr, terminals only)."""
    text = str(spec)
    if ":" in text and not Path(text).exists() and text.split(":", 1)[0].endswith(".py"):
        from pai_compiler.frontends.torch.spec import load_torch_spec  # type: ignore[import-not-found]  # torch: heavy, optional

        return load_torch_spec(text, progress=progress, **kwargs)
    for option, flag, default in (("input_shape", "--input-shape", None), ("frontend", "--frontend", "auto"), ("prune_tied", "--prune-tied", False)):
        if kwargs.get(option, default) not in (default, None):
            raise UsageError(f"{flag} applies to PyTorch models (file.py:attr); {text} is read as an ONNX model, "
                             f"whose inputs and weights come from the file: drop {flag}")
    return load_onnx_model(text, static_dims=static_dims, progress=progress)


def build_passes(
    *,
    method: str = DEFAULT_METHOD,
    sparsity: float | None = None,
    allocation: str = "erk",
    pipeline: str | None = None,
    steps: int | None = None,
    latency: float | None = None,
) -> list[Pass]:
    """The passes for the CLI flags: ``pipeline`` text parsed (once), else an allocation and a criterion built directly.
    ``steps`` and ``latency`` are dpai's options (``latency``: its latency knob, 0 to 1)."""
    dpai_options = {key: value for key, value in (("steps", steps), ("latency", latency)) if value is not None}
    if pipeline:
        if sparsity is not None:
            raise UsageError("--sparsity does not combine with --pipeline; put it in the pipeline, e.g. 'erk{sparsity=0.95},...'")
        if dpai_options:
            flag, value = next(iter(dpai_options.items()))
            raise UsageError(f"--{flag} does not combine with --pipeline; put it in the pipeline, e.g. 'erk{{sparsity=0.95}},dpai{{{flag}={value}}}'")
        return parse_pipeline(pipeline)
    if sparsity is None:
        raise UsageError("--sparsity is required (e.g. --sparsity 0.95) unless --pipeline is given")
    if allocation not in ALLOCATIONS:
        raise UsageError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    if dpai_options and method != "dpai":
        raise UsageError(f"--{next(iter(dpai_options))} applies to --method dpai only")
    if isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool):
        sparsity = float(sparsity)  # a numpy float prints as np.float64(...) in the pipeline text; the pass checks the range
    if allocation == "global":
        if method in _LAYERWISE_ONLY:
            raise UsageError(f"--method {method} needs a per-layer allocation (--allocation erk or uniform)")
        return [make_pass(method, sparsity=sparsity, **_global_scope(method))]
    budget = make_pass(allocation, sparsity=sparsity)
    if dpai_options:
        return [budget, make_pass(method, **dpai_options)]
    return [budget, make_pass(method) if method in _LAYERWISE_ONLY else make_pass(method, scope="layer")]


def _global_scope(method: str) -> dict[str, str]:
    """``scope=global`` for a criterion that has a scope option (``random`` defaults to per-layer), else nothing."""
    has_scope = any(option == "scope" for option, _, _ in pass_options(get_pass_class(method)))
    return {"scope": "global"} if has_scope else {}


def has_pass(passes: Sequence[Pass], name: str) -> bool:
    """Whether ``passes`` run the pass ``name``."""
    return any(p.name == name for p in passes)


def check_device(device: str) -> None:
    """``cpu``, ``cuda`` or ``cuda:N`` of a GPU torch can see; anything else is a usage error, raised before any work."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device == "cpu":
        return
    import torch  # heavy optional dependency: only for a GPU device

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.split(":")[1]) if ":" in device else 0
    if count == 0:
        raise UsageError(f"--device {device}: torch {torch.__version__} sees no CUDA device; use --device cpu")
    if index >= count:
        raise UsageError(f"--device {device}: torch sees {count} CUDA device(s) (cuda:0..cuda:{count - 1})")


def check_align(align: int) -> None:
    """``--align``: checked by the dead-node-elim pass it configures, before any work."""
    DeadNodeElimPass(align=align)


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


@dataclass(frozen=True)
class Exclusion:
    """What ``--exclude`` did: the layers kept dense and a warning per pattern that matched none."""

    layers: list[str]
    warnings: list[str]


def apply_exclude(graph: Graph, patterns: Sequence[str]) -> Exclusion:
    """Keep layers whose weight name matches any glob dense (not prunable)."""
    excluded: list[str] = []
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
    warnings = [f"--exclude pattern(s) {', '.join(unmatched)} matched no prunable layer"] if unmatched else []
    return Exclusion(excluded, warnings)


@dataclass
class OptimizeResult:
    graph: Graph
    passes: list[Pass]
    records: list[PassRecord]
    excluded: list[str] = field(default_factory=list)
    allocation: Allocation | None = None  # the per-layer keep counts an allocation pass provided, if one ran
    warnings: list[str] = field(default_factory=list)  # the frontend's, --exclude's and the passes', in that order

    def report_of(self, kind: type[ReportT]) -> ReportT | None:
        """The report of type ``kind`` the last pass that gave one left in its record (e.g. ``DpaiReport``), or None."""
        reports = [r.report for r in self.records if isinstance(r.report, kind)]
        return reports[-1] if reports else None

    @property
    def pipeline(self) -> str:
        """The passes as pipeline text (``erk{sparsity=0.95},dpai``), as reports and model metadata give it."""
        return format_pipeline(self.passes)

    @property
    def compact_report(self) -> CompactReport:
        """What the pipeline's dead-node-elim passes did (``applied`` False when none changed the graph)."""
        return compact_report_of(self.records)

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
    passes: Sequence[Pass] | None = None,
    seed: int = 0,
    steps: int | None = None,
    latency: float | None = None,
    exclude: Sequence[str] = (),
    device: str = "cpu",
    data: Any = None,
    progress: bool = False,
    instruments: Sequence[Instrument] = (),
) -> OptimizeResult:
    """Prune ``model`` (a path or an IR Graph, which is modified) and return the result.

    ``passes`` (built by the caller, e.g. with :func:`build_passes`) replaces the flags
    sparsity/method/allocation/pipeline/steps/latency. ``data`` (snip/grasp/autosparse): a loaded batch,
    or what ``--data`` takes, an ``.npz`` path or ``"random"`` (10 samples per class, ``seed``)."""
    check_device(device)
    if passes is None:
        passes = build_passes(method=method, sparsity=sparsity, allocation=allocation, pipeline=pipeline, steps=steps, latency=latency)
    passes = list(passes)
    graph = model if isinstance(model, Graph) else load_model(model)
    if isinstance(data, (str, os.PathLike)):
        from pai_compiler.lab.data import load_batch_for

        data = load_batch_for(graph, data, seed=seed)
    exclusion = apply_exclude(graph, exclude)
    warnings = [*graph.meta["warnings"], *exclusion.warnings]  # the frontend's (from lowering the model), then --exclude's
    if not graph.prunable_params():
        warnings.append("the model has no prunable (conv/linear) weights: nothing to prune, written unchanged")
        return OptimizeResult(graph, passes, [], exclusion.layers, warnings=warnings)
    am = AnalysisManager(graph, RunContext(seed=seed, device=device, progress=progress, data=data))
    records = PassManager(passes, instruments=instruments).run(graph, am)
    unmasked = [p.name for p in graph.prunable_params() if p.mask is None]
    if unmasked and len(unmasked) == len(graph.prunable_params()):
        raise UsageError(f"pipeline '{format_pipeline(passes)}' produced no masks: add a criterion (e.g. ',magnitude{{scope=layer}}')")
    return OptimizeResult(graph, passes, records, exclusion.layers, am.provided(Allocation), [*warnings, *am.warnings])


def save_model(result: OptimizeResult, source: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Write the pruned model; the format follows ``out``'s suffix (.onnx, or .pt with the torch backend)."""
    report = result.compact_report
    if report.applied:  # dead-node-elim ran (e.g. in --pipeline): layers changed shape
        save_compact(result.graph, source, out, report, pipeline=result.pipeline)
        return
    if output_suffix(out) == ".onnx":
        if result.graph.meta.get("source_format") == "onnx":
            write_masked_onnx(result.graph, source, out, pipeline=result.pipeline)
            return
        from pai_compiler.backends.torch_backend import write_torch_onnx  # type: ignore[import-not-found]  # torch: heavy, optional

        write_torch_onnx(result, out)
        return
    from pai_compiler.backends.torch_backend import write_pt  # type: ignore[import-not-found]  # torch: heavy, optional

    write_pt(result, source, out)


def compact_graph(graph: Graph, *, align: int = 1, instruments: Sequence[Instrument] = (), progress: bool = False) -> CompactReport:
    """Run ``dead-node-elim`` on ``graph`` in place: dead channels removed, function unchanged.

    ``align`` > 1 keeps a few dead channels so conv/linear widths stay multiples of it (faster
    kernels in ONNX Runtime; exact all the same). Returns what it did; merge it after an
    earlier report of the same graph with ``earlier.then(report)``. ``progress``: the rounds may draw a bar (terminals only)."""
    am = AnalysisManager(graph, RunContext(progress=progress))
    return compact_report_of(PassManager([DeadNodeElimPass(align=align)], instruments=instruments).run(graph, am))


def save_compact(graph: Graph, source: str | os.PathLike[str], out: str | os.PathLike[str], report: CompactReport, *,
                 pipeline: str = "", batch: int = 1, threads: int = 1, device: str = "cpu", progress: bool = False,
                 input_shape: tuple[int, ...] | None = None) -> dict[str, Any] | None:
    """Write a compacted graph: .onnx rewrites the source ONNX model; .pt saves a torch SparseModule
    whose conv/linear layers run dense or sparse, whichever was faster at ``batch``/``threads`` on
    ``device`` (returns that choice, the ``sparse_exec`` report block; None for .onnx).

    ``report``: everything dead-node-elim did to ``graph`` since it was read (the ONNX rewrite
    needs the changed Params, Reshapes and Splits). ``progress``: the kernel timing of a .pt shows a bar (terminals only).
    ``input_shape``: the first input's full shape to time at (binds symbolic dims past the batch)."""
    from pai_compiler.backends.onnx_compact import write_compact_onnx

    if output_suffix(out) == ".onnx":
        write_compact_onnx(graph, source, out, report, pipeline=pipeline)
        return None
    from pai_compiler.backends.sparse_select import build_sparse_module
    from pai_compiler.io import save_torch_atomic

    def onnx_twin(path: Path) -> None:  # the same compact model as ONNX, timed in onnxruntime against the module
        write_compact_onnx(graph, source, path, report, pipeline=pipeline, check=False)

    twin = onnx_twin if graph.meta.get("source_format") == "onnx" else None
    module, choice = build_sparse_module(graph, batch=batch, threads=threads, device=device, onnx_twin=twin,
                                         onnx_name=Path(out).with_suffix(".onnx").name, progress=progress, input_shape=input_shape)
    save_torch_atomic(out, module)
    return choice.to_dict()
