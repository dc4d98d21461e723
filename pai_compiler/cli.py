"""The ``paic`` command line (typer): optimize, audit, compact, bench, passes, autosparse.

``optimize``, ``audit`` and ``passes`` live here; ``compact``/``bench`` in
:mod:`pai_compiler.cli_compact`, ``autosparse`` in :mod:`pai_compiler.cli_autosparse`, what they
share (the app, the error guard and exit codes) in :mod:`pai_compiler.cli_app`. Exit codes: 0
ok, 1 model/processing error (one line on stderr, no traceback unless ``--debug``), 2 usage
error. Heavy modules (torch, onnx, onnxruntime) are imported inside the commands, so ``paic
--help`` stays fast.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from pai_compiler.cli_app import (
    QUIET_HELP, QUIET_RESULT_HELP, app, check_auto_output, checked_report_path, guard, parse_align_flag, parse_float_flag, stdout_console,
    split_timing_shape, torch_options, write_report,
)
from pai_compiler.cli_autosparse import autosparse_app
from pai_compiler.cli_compact import bench, compact
from pai_compiler.cli_output import audit_totals, compact_summary, optimize_report, render_compact_written, render_optimize
from pai_compiler.progress import bars_wanted

if TYPE_CHECKING:  # the commands import these when they run, so `paic --help` stays fast
    from pai_compiler.api import OptimizeResult
    from pai_compiler.pass_infra import Pass

__all__ = ["app", "main"]


@app.command()
def optimize(
    model: Annotated[str, typer.Argument(help="ONNX file, or file.py:attr for a PyTorch model.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Output model (.onnx, or .pt for PyTorch).")],
    sparsity: Annotated[Optional[str], typer.Option("--sparsity", "-s", help="Fraction of prunable weights to remove, in (0, 1).")] = None,
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="Pruning criterion (see `paic passes`).")] = None,
    allocation: Annotated[str, typer.Option("--allocation", help="Layer budget: erk, uniform, or global (one threshold over all layers).")] = "erk",
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    pipeline: Annotated[Optional[str], typer.Option("--pipeline", "-p", help="Full pass pipeline, e.g. 'erk{sparsity=0.95},magnitude{scope=layer}'.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Glob of layer/weight names to keep dense (repeatable).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimisation steps (dpai).")] = None,
    latency: Annotated[Optional[str], typer.Option("--latency", help="dpai's latency knob, 0 to 1 (default 0, as published): more dead channels for --compact (ResNet-20 99 %: 2.2x -> 3.0-3.65x dense onnxruntime at 0.25-1).")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    data: Annotated[Optional[str], typer.Option("--data", help="Prune data for snip/grasp: an .npz with x_train/y_train (e.g. cifar10.npz), or 'random'.")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Samples per class taken from --data.")] = 10,
    input_shape: Annotated[Optional[list[str]], typer.Option("--input-shape", help="Example input of a PyTorch model, batch first: 2,3,32,32 (positional) or NAME=2,24:int64 (keyword; repeatable; :DTYPE, default float32). ONNX model with --compact: the first input's full shape to time at (e.g. 1,128).")] = None,
    frontend: Annotated[str, typer.Option("--frontend", help="PyTorch frontend: auto (torch.fx, then torch.export if fx fails), fx or export.")] = "auto",
    prune_tied: Annotated[bool, typer.Option("--prune-tied", help="Prune a weight tied to an embedding table (an LM head); by default it stays dense, with a warning.")] = False,
    report: Annotated[Optional[str], typer.Option("--report", help="Write the JSON report here.")] = None,
    compact: Annotated[bool, typer.Option("--compact", help="Remove dead channels (dead-node-elim) and write the smaller model instead of the masked one.")] = False,
    align: Annotated[str, typer.Option("--align", help="With --compact: keep layer widths multiples of N (faster ORT kernels; still exact); 'auto' (.onnx output): time align 1, 4, 8 and the masked model in onnxruntime (batch 1, 1 thread) and write the fastest.")] = "1",
    force: Annotated[bool, typer.Option("--force", help="Allow overwriting the input file.")] = False,
    print_ir_after_all: Annotated[bool, typer.Option("--print-ir-after-all", help="Print the IR after every pass (stderr).")] = False,
    timing: Annotated[bool, typer.Option("--timing", help="Print per-pass timings.")] = False,
    no_paths: Annotated[bool, typer.Option("--no-paths", help="Skip path/node counts in the before/after totals (faster on huge models).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_HELP)] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Prune MODEL before training and write a masked model."""
    with guard(debug):
        from pai_compiler import api
        from pai_compiler.io import check_output_path
        from pai_compiler.memory import release_all

        align_value = parse_align_flag(align)
        passes = _optimize_passes(sparsity, method, allocation, pipeline, steps=steps, latency=latency, compact=compact, align=align_value, device=device)
        is_file = Path(model).exists() or ":" not in model
        out = check_output_path(output, [model] if is_file else [], force=force)
        api.check_output_format(out, torch_source=not is_file, compact=compact or api.has_pass(passes, "dead-node-elim"))
        check_auto_output(align_value, out)
        report_path = checked_report_path(report, out, [model] if is_file else [], force=force)
        progress = bars_wanted(quiet=quiet)
        input_shape, timing_shape = split_timing_shape(input_shape, onnx_model=is_file, compact=compact)
        graph = api.load_model(model, progress=progress, **torch_options(input_shape, frontend, prune_tied=prune_tied))
        batch = _prune_data(graph, data, samples, seed)
        before = audit_totals(graph, paths=not no_paths, progress=progress)
        timer, instruments = _instruments(timing, print_ir_after_all)
        result = api.optimize(
            graph, passes=passes, seed=seed, exclude=exclude or (), device=device,
            data=batch, progress=progress, instruments=instruments,
        )
        release_all()  # the criterion may have read every weight (magnitude) or allocated a lot
        after = audit_totals(result.graph, paths=not no_paths, progress=progress)
        unsaved = len(result.graph.meta["warnings"])
        compact_doc = _save_optimized(result, model, out, after, compact=compact, align=align_value, instruments=instruments, progress=progress,
                                      timing_shape=timing_shape)
        # the run's warnings, then those the backend noted on the graph while writing
        warnings = [*dict.fromkeys(result.warnings), *result.graph.meta["warnings"][unsaved:]]
        doc = optimize_report(result, before, after, model, str(out), warnings)
        if compact_doc is not None:
            doc["compact"] = compact_doc
        write_report(report_path, doc)
        if not quiet:
            _render_optimized(result, before, after, str(out), timer.timings if timing else [], warnings, compact_doc)


def _render_optimized(result: OptimizeResult, before: dict[str, Any], after: dict[str, Any], out: str, timings: list[Any],
                      warnings: list[str], compact_doc: Optional[dict[str, Any]]) -> None:
    """The run's tables on stdout: layers, totals before/after, timings, warnings, and the compaction summary."""
    console = stdout_console()
    render_optimize(console, result, before, after, out, timings, warnings)
    if compact_doc is not None:
        render_compact_written(console, compact_doc, out, layers=False)


def _prune_data(graph: Any, data: Optional[str], samples: int, seed: int) -> Any:
    """``--data``: the prune batch for data-driven criteria (None without the flag)."""
    if data is None:
        return None
    from pai_compiler.lab.data import load_batch_for

    return load_batch_for(graph, data, samples_per_class=samples, seed=seed)


def _optimize_passes(sparsity: Optional[str], method: Optional[str], allocation: str, pipeline: Optional[str], *,
                     steps: Optional[int], latency: Optional[str], compact: bool, align: Optional[int], device: str) -> list[Pass]:
    """The flags' usage checks, before any work, and the passes they build (pipeline text parsed once)."""
    from pai_compiler import api
    from pai_compiler.errors import UsageError

    sparsity_value = parse_float_flag("--sparsity", sparsity)
    latency_value = parse_float_flag("--latency", latency)
    if method is not None and pipeline is not None:
        raise UsageError("--method and --pipeline exclude each other: name the criterion in the pipeline")
    if align != 1 and not compact:
        raise UsageError("--align applies with --compact only")
    if align is not None:
        api.check_align(align)
    api.check_device(device)
    return api.build_passes(method=method or api.DEFAULT_METHOD, sparsity=sparsity_value, allocation=allocation, pipeline=pipeline, steps=steps,
                            latency=latency_value)


def _save_optimized(result: OptimizeResult, model: str, out: Path, after: dict[str, Any], *, compact: bool, align: Optional[int],
                    instruments: list[Any], progress: bool, timing_shape: Optional[tuple[int, ...]] = None) -> Optional[dict[str, Any]]:
    """Write the masked model, or with ``--compact`` the compacted one; returns the compaction summary (or None).

    ``align`` None (``--align auto``): the masked model goes to a temporary file beside ``out``, and the fastest of
    it and its compact candidates in onnxruntime is written (``pai_compiler.align_choice``)."""
    from pai_compiler import api

    if not compact:
        api.save_model(result, model, out)
        return None
    if align is None:
        from pai_compiler.align_choice import choose_align, masked_temp

        with masked_temp(out) as masked:
            api.save_model(result, model, masked)
            choice = choose_align(masked, out, pipeline=result.pipeline, progress=progress, input_shape=timing_shape)
        compacted = result.compact_report  # the masked model stayed: nothing more was removed
        if choice.chosen is not None:
            compacted = compacted.then(api.compact_graph(result.graph, align=choice.chosen, instruments=instruments, progress=progress))
        return {**compact_summary(after, result.graph, compacted), "align_choice": choice.to_dict()}
    compacted = result.compact_report.then(api.compact_graph(result.graph, align=align, instruments=instruments, progress=progress))
    compact_doc = compact_summary(after, result.graph, compacted)
    sparse_doc = api.save_compact(result.graph, model, out, compacted, pipeline=result.pipeline, progress=progress, input_shape=timing_shape)
    if sparse_doc is not None:
        compact_doc["sparse_exec"] = sparse_doc
    return compact_doc


def _instruments(timing: bool, print_ir_after_all: bool) -> tuple[Any, list[Any]]:
    """The timing instrument (always made, listed with ``--timing``) and the instruments to run."""
    from pai_compiler.pass_infra import PrintIRInstrument, TimingInstrument

    timer = TimingInstrument()
    instruments: list[Any] = [timer] if timing else []
    if print_ir_after_all:
        instruments.append(PrintIRInstrument(sys.stderr))
    return timer, instruments


@app.command()
def audit(
    model: Annotated[str, typer.Argument(help="ONNX file, or file.py:attr for a PyTorch model.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the JSON document instead of tables.")] = False,
    bind: Annotated[Optional[str], typer.Option("--bind", help="Bind symbolic dims for the MAC counts, e.g. batch=32,seq=197 (unbound: 1).")] = None,
    plot: Annotated[Optional[str], typer.Option("--plot", help="Write a PNG of per-layer density and effective nodes (needs matplotlib).")] = None,
    no_paths: Annotated[bool, typer.Option("--no-paths", help="Sparsity and MACs only: skip the path analysis (fast, no torch).")] = False,
    input_shape: Annotated[Optional[list[str]], typer.Option("--input-shape", help="Example input of a PyTorch model, batch first: 2,3,32,32 (positional) or NAME=2,24:int64 (keyword; repeatable; :DTYPE, default float32).")] = None,
    frontend: Annotated[str, typer.Option("--frontend", help="PyTorch frontend: auto (torch.fx, then torch.export if fx fails), fx or export.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_RESULT_HELP)] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Report sparsity, MACs (dense/nonzero/effective) and effective paths/nodes of MODEL."""
    with guard(debug):
        from pai_compiler import api
        from pai_compiler.audit import audit_graph, plot_audit, render_audit
        from pai_compiler.io import check_output_path
        from pai_compiler.passes.analysis.bindings import parse_bind

        values = parse_bind(bind)
        is_file = Path(model).exists() or ":" not in model
        plot_path = check_output_path(plot, [model] if is_file else [], force=False) if plot else None
        progress = bars_wanted(quiet=quiet, json_output=json_output)
        # unbound symbols count as 1: without --bind, bind them at load (a static graph, no sympy)
        graph = api.load_model(model, static_dims=None if values else 1, progress=progress, **torch_options(input_shape, frontend))
        doc = audit_graph(graph, bind=values, paths=not no_paths, progress=progress)
        if plot_path is not None:
            plot_audit(doc, plot_path)
        if json_output:
            sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        else:
            render_audit(doc, stdout_console())


app.command()(compact)
app.command()(bench)


@app.command()
def passes(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """List the available passes with their kind and options."""
    with guard(debug):
        from rich.markup import escape
        from rich.table import Table

        from pai_compiler.errors import PaicError
        from pai_compiler.pipeline import pass_options
        from pai_compiler.registry import available_passes, get_pass_class

        table = Table(title="paic passes")
        table.add_column("name")
        table.add_column("kind")
        table.add_column("options (default)")
        for name in available_passes():
            try:
                cls = get_pass_class(name)
            except PaicError as exc:  # one broken plugin must not hide the others
                table.add_row(name, "[red]unavailable[/]", escape(str(exc)))
                continue
            opts = ", ".join(f"{n}={d}" for n, _, d in pass_options(cls))
            table.add_row(name, cls.kind, escape(opts) or "-")
        stdout_console().print(table)


app.add_typer(autosparse_app, name="autosparse")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
