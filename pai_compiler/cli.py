"""The ``paic`` command line (typer): optimize, audit, compact, bench, passes.

Exit codes: 0 ok, 1 model/processing error (one line on stderr, no traceback unless
``--debug``), 2 usage error. Heavy modules (torch, onnx, onnxruntime) are imported inside the
commands, so ``paic --help`` stays fast.
"""
from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from pai_compiler._version import __version__
from pai_compiler.progress import bars_wanted
from pai_compiler.cli_output import (
    audit_totals, compact_summary, optimize_report, render_compact, render_kept_dead, render_optimize,
)

if TYPE_CHECKING:  # the commands import these when they run, so `paic --help` stays fast
    from pai_compiler.api import OptimizeResult
    from pai_compiler.pass_infra import Pass

__all__ = ["app", "main"]

# -q on every command with long work: bars (stderr, terminals only, never under --json) are its first casualty
QUIET_HELP = "Print nothing but errors (no progress bars, no summary)."
QUIET_RESULT_HELP = "No progress bars (the result itself still prints)."

app = typer.Typer(
    name="paic",
    help="paic — the Pruning-at-Initialization Compiler: analyse and prune ONNX/PyTorch models before training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _stdout_console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


@contextlib.contextmanager
def guard(debug: bool) -> Iterator[None]:
    """Turn failures into one line on stderr and the right exit code."""
    from pai_compiler.errors import PaicError

    try:
        yield
    except typer.Exit:
        raise
    except PaicError as exc:
        if debug:
            raise
        from rich.markup import escape

        message = " ".join(str(exc).split())
        _stderr_console().print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)
        raise typer.Exit(code=exc.exit_code) from None
    except OSError as exc:  # disk full, permission denied...: the user's environment, not a bug
        if debug:
            raise
        from rich.markup import escape

        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        _stderr_console().print(f"[bold red]error:[/] {escape(exc.strerror or str(exc))}{escape(where)}")
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        _stderr_console().print("interrupted")
        raise typer.Exit(code=130) from None
    except Exception as exc:
        if debug:
            raise
        from rich.markup import escape

        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        _stderr_console().print(f"[bold red]internal error:[/] {escape(message)} (rerun with --debug for a traceback)")
        raise typer.Exit(code=1) from None


def _version_callback(value: bool) -> None:
    if value:
        print(f"paic {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """paic command line."""


def _parse_float_flag(name: str, value: Optional[str]) -> Optional[float]:
    from pai_compiler.errors import UsageError

    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"{name} must be a number, got {value!r}") from None
    if number != number:
        raise UsageError(f"{name} must be a number, got NaN")
    return number


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
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    data: Annotated[Optional[str], typer.Option("--data", help="Prune data for snip/grasp: an .npz with x_train/y_train (e.g. cifar10.npz), or 'random'.")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Samples per class taken from --data.")] = 10,
    input_shape: Annotated[Optional[list[str]], typer.Option("--input-shape", help="Example input of a PyTorch model, batch first: 2,3,32,32 (positional) or NAME=2,24:int64 (keyword; repeatable; :DTYPE, default float32).")] = None,
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

        align_value = _parse_align(align)
        passes = _optimize_passes(sparsity, method, allocation, pipeline, steps, compact=compact, align=align_value, device=device)
        is_file = Path(model).exists() or ":" not in model
        out = check_output_path(output, [model] if is_file else [], force=force)
        api.check_output_format(out, torch_source=not is_file, compact=compact or api.has_pass(passes, "dead-node-elim"))
        _check_auto_output(align_value, out)
        report_path = _report_path(report, out, [model] if is_file else [], force=force)
        progress = bars_wanted(quiet=quiet)
        graph = api.load_model(model, progress=progress, **_torch_options(input_shape, frontend, prune_tied=prune_tied))
        batch = None
        if data is not None:
            from pai_compiler.lab.data import load_batch_for

            batch = load_batch_for(graph, data, samples_per_class=samples, seed=seed)
        before = audit_totals(graph, paths=not no_paths, progress=progress)
        timer, instruments = _instruments(timing, print_ir_after_all)
        result = api.optimize(
            graph, passes=passes, seed=seed, exclude=exclude or (), device=device,
            data=batch, progress=progress, instruments=instruments,
        )
        release_all()  # the criterion may have read every weight (magnitude) or allocated a lot
        after = audit_totals(result.graph, paths=not no_paths, progress=progress)
        unsaved = len(result.graph.meta["warnings"])
        compact_doc = _save_optimized(result, model, out, after, compact=compact, align=align_value, instruments=instruments, progress=progress)
        # the run's warnings, then those the backend noted on the graph while writing
        warnings = [*dict.fromkeys(result.warnings), *result.graph.meta["warnings"][unsaved:]]
        doc = optimize_report(result, before, after, model, str(out), warnings)
        if compact_doc is not None:
            doc["compact"] = compact_doc
        _write_report(report_path, doc)
        if not quiet:
            console = _stdout_console()
            render_optimize(console, result, before, after, str(out), timer.timings if timing else [], warnings)
            if compact_doc is not None:
                _render_compact_written(console, compact_doc, str(out), layers=False)


def _optimize_passes(sparsity: Optional[str], method: Optional[str], allocation: str, pipeline: Optional[str], steps: Optional[int],
                     *, compact: bool, align: Optional[int], device: str) -> list[Pass]:
    """The flags' usage checks, before any work, and the passes they build (pipeline text parsed once)."""
    from pai_compiler import api
    from pai_compiler.errors import UsageError

    sparsity_value = _parse_float_flag("--sparsity", sparsity)
    if method is not None and pipeline is not None:
        raise UsageError("--method and --pipeline exclude each other: name the criterion in the pipeline")
    if align != 1 and not compact:
        raise UsageError("--align applies with --compact only")
    if align is not None:
        api.check_align(align)
    api.check_device(device)
    return api.build_passes(method=method or api.DEFAULT_METHOD, sparsity=sparsity_value, allocation=allocation, pipeline=pipeline, steps=steps)


def _parse_align(align: str) -> Optional[int]:
    """``--align``: N, or None for ``auto`` (a usage error names the flag otherwise)."""
    from pai_compiler.align_choice import parse_align

    return parse_align(align)


def _check_auto_output(align: Optional[int], out: Path) -> None:
    """``--align auto`` times compact ONNX candidates: a usage error for any other output."""
    from pai_compiler import api
    from pai_compiler.errors import UsageError

    if align is None and api.output_suffix(out) != ".onnx":
        raise UsageError(f"--align auto picks the fastest compact ONNX model; {out} is not .onnx: use -o X.onnx, or a number "
                         "(-o X.pt already runs each layer dense or sparse, whichever is faster)")


def _save_optimized(result: OptimizeResult, model: str, out: Path, after: dict[str, Any], *, compact: bool, align: Optional[int],
                    instruments: list[Any], progress: bool) -> Optional[dict[str, Any]]:
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
            choice = choose_align(masked, out, pipeline=result.pipeline, progress=progress)
        compacted = result.compact_report  # the masked model stayed: nothing more was removed
        if choice.chosen is not None:
            compacted = compacted.then(api.compact_graph(result.graph, align=choice.chosen, instruments=instruments, progress=progress))
        return {**compact_summary(after, result.graph, compacted), "align_choice": choice.to_dict()}
    compacted = result.compact_report.then(api.compact_graph(result.graph, align=align, instruments=instruments, progress=progress))
    compact_doc = compact_summary(after, result.graph, compacted)
    sparse_doc = api.save_compact(result.graph, model, out, compacted, pipeline=result.pipeline, progress=progress)
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


def _write_report(report_path: Optional[Path], doc: dict[str, Any]) -> None:
    """Write the JSON report atomically (nothing without ``--report``)."""
    if report_path is None:
        return
    from pai_compiler.io import atomic_write

    with atomic_write(report_path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")


def _report_path(report: Optional[str], out: Path, inputs: list[str], *, force: bool) -> Optional[Path]:
    """The checked ``--report`` path: never the model input (without --force) nor the model output."""
    if report is None:
        return None
    from pai_compiler.errors import UsageError
    from pai_compiler.io import check_output_path

    path = check_output_path(report, inputs, force=force)
    if path.resolve() == out.resolve():
        raise UsageError(f"--report {report} is the output model's path: give the report its own file")
    return path


def _torch_options(input_shape: Optional[list[str]], frontend: str, *, prune_tied: bool = False) -> dict[str, Any]:
    """load_model options for a file.py:attr spec (an ONNX model refuses the torch-only ones)."""
    from pai_compiler.errors import UsageError

    if frontend not in ("auto", "fx", "export"):
        raise UsageError(f"--frontend must be auto, fx or export, got {frontend!r}")
    return {"input_shape": input_shape or None, "frontend": frontend, "prune_tied": prune_tied}


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
        graph = api.load_model(model, static_dims=None if values else 1, progress=progress, **_torch_options(input_shape, frontend))
        doc = audit_graph(graph, bind=values, paths=not no_paths, progress=progress)
        if plot_path is not None:
            plot_audit(doc, plot_path)
        if json_output:
            sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        else:
            render_audit(doc, _stdout_console())


@app.command()
def compact(
    model: Annotated[str, typer.Argument(help="A sparse ONNX model (zero weights are taken as pruned).")],
    output: Annotated[str, typer.Option("-o", "--output", help="Output compact model (.onnx, or .pt for a torch module).")],
    report: Annotated[Optional[str], typer.Option("--report", help="Write the JSON report here.")] = None,
    align: Annotated[str, typer.Option("--align", help="Keep layer widths multiples of N (faster ORT kernels; still exact); 'auto' (-o X.onnx): compact at align 1, 4 and 8, time them and the masked model alternating in onnxruntime, write the fastest (the masked model unchanged if it wins).")] = "1",
    batch: Annotated[Optional[int], typer.Option("--batch", help="With -o X.pt or --align auto: the batch size the kernels/models are timed at (default 1).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="With -o X.pt or --align auto: torch/onnxruntime threads for that timing (default 1).")] = None,
    device: Annotated[str, typer.Option("--device", help="With -o X.pt: cpu or cuda (where the module will run).")] = "cpu",
    explain: Annotated[bool, typer.Option("--explain", help="List what kept dead channels (reason, node, channel count).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Allow overwriting the input file.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_HELP)] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Remove the dead channels of an already-sparse ONNX MODEL and write the compact model
    (.pt: a torch module running each conv/linear dense or sparse, whichever is faster;
    --align auto: the fastest of the compact candidates and the masked model in onnxruntime)."""
    with guard(debug):
        from pai_compiler import api
        from pai_compiler.audit import masks_from_zeros
        from pai_compiler.errors import UsageError
        from pai_compiler.io import check_output_path

        out = check_output_path(output, [model], force=force)
        align_value = _check_compact_flags(out, align, batch, threads, device)
        report_path = _report_path(report, out, [model], force=force)
        progress = bars_wanted(quiet=quiet)
        graph = api.load_model(model, progress=progress)
        if graph.meta.get("source_format") != "onnx":
            raise UsageError("paic compact reads ONNX models; for PyTorch use `paic optimize --compact`")
        masks_from_zeros(graph)
        masked = audit_totals(graph, progress=progress)
        unsaved = len(graph.meta["warnings"])
        choice, compacted = _compact_at(graph, model, out, align_value, batch=batch or 1, threads=threads or 1, progress=progress)
        sparse_doc = None if choice else api.save_compact(graph, model, out, compacted, batch=batch or 1, threads=threads or 1, device=device,
                                                          progress=progress)
        # the frontend's warnings, then those the backend noted on the graph while writing
        warnings = [*dict.fromkeys(graph.meta["warnings"][:unsaved]), *graph.meta["warnings"][unsaved:]]
        doc = {"model": model, "output": str(out), "paic_version": __version__, **compact_summary(masked, graph, compacted),
               "warnings": warnings}
        if sparse_doc is not None:
            doc["sparse_exec"] = sparse_doc
        if choice is not None:
            doc["align_choice"] = choice.to_dict()
        _write_report(report_path, doc)
        if not quiet:
            console = _stdout_console()
            _render_compact_written(console, doc, str(out))
            if sparse_doc is not None:
                from pai_compiler.bench import render_sparse_exec

                render_sparse_exec(console, sparse_doc)
            if explain:
                render_kept_dead(console, compacted)
            elif doc["params_after"] > 0.9 * doc["params_before"] and compacted.kept_dead_channels:
                console.print("little was removed: `paic compact --explain` lists what kept the dead channels")
            for w in doc["warnings"]:
                console.print(f"[yellow]warning:[/] {w}")


def _check_compact_flags(out: Path, align: str, batch: Optional[int], threads: Optional[int], device: str) -> Optional[int]:
    """``paic compact``'s usage checks, before any work; returns the alignment (None: ``--align auto``)."""
    from pai_compiler import api
    from pai_compiler.errors import UsageError

    api.check_output_format(out, torch_source=False, compact=True)
    align_value = _parse_align(align)
    _check_auto_output(align_value, out)
    torch_output = api.output_suffix(out) == ".pt"
    if not torch_output and (device != "cpu" or (align_value is not None and (batch is not None or threads is not None))):
        raise UsageError("--batch, --threads and --device time the kernels of a torch output: use -o FAST.pt "
                         "(or --align auto, which times ONNX candidates at --batch/--threads on the cpu)")
    for flag, value in (("--batch", batch), ("--threads", threads)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be a positive integer, got {value}")
    api.check_device(device)
    return align_value


def _compact_at(graph: Any, model: str, out: Path, align: Optional[int], *, batch: int, threads: int, progress: bool) -> tuple[Any, Any]:
    """Compact ``graph`` in place at ``align``; None (``--align auto``) first writes the fastest form in onnxruntime to
    ``out`` and compacts at its alignment, or not at all when the masked model stayed. Returns (choice or None, report)."""
    from pai_compiler import api
    from pai_compiler.passes.transform.dead_node_elim import CompactReport

    if align is not None:
        return None, api.compact_graph(graph, align=align, progress=progress)
    from pai_compiler.align_choice import choose_align

    choice = choose_align(model, out, batch=batch, threads=threads, progress=progress)
    if choice.chosen is None:  # the masked model stayed: the summary says nothing was removed
        return choice, CompactReport()
    return choice, api.compact_graph(graph, align=choice.chosen, progress=progress)


def _render_compact_written(console: Any, doc: dict[str, Any], out: str, *, layers: bool = True) -> None:
    """The compaction summary, or with ``--align auto`` the choice's line (only that when the masked model stayed)."""
    choice = doc.get("align_choice")
    if choice is None or choice["chosen"] != "masked":
        render_compact(console, doc, out, layers=layers)
    if choice is not None:
        from pai_compiler.align_choice import choice_line

        console.print(choice_line(choice), soft_wrap=True)


@app.command()
def bench(
    models: Annotated[list[str], typer.Argument(help="Models to time: .onnx (onnxruntime) and .pt (a pickled torch module); the first is the baseline.")],
    batch: Annotated[Optional[int], typer.Option("--batch", help="Batch size bound to a symbolic first dim (default 1).")] = None,
    threads: Annotated[int, typer.Option("--threads", help="Intra-op threads (onnxruntime session, torch.set_num_threads).")] = 1,
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", help="Full shape of the first input, batch first, e.g. 1,3,32,32.")] = None,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed rounds (the median is reported).")] = 10,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs of each model first.")] = 3,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_RESULT_HELP)] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Median latency of each MODEL on one input, speed-up against the first, and output agreement."""
    with guard(debug):
        from pai_compiler.bench import bench_models, render_bench

        doc = bench_models(models, batch=batch, threads=threads, input_shape=input_shape, repeats=repeats, warmup=warmup,
                           progress=bars_wanted(quiet=quiet, json_output=json_output)).to_dict()
        if json_output:
            sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        else:
            render_bench(_stdout_console(), doc)


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
        _stdout_console().print(table)


autosparse_app = typer.Typer(name="autosparse", help="AutoSparse: learn a pruning-at-init score from iterative rewind pruning.",
                             no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(autosparse_app, name="autosparse")


@autosparse_app.command("collect")
def autosparse_collect(
    model: Annotated[str, typer.Argument(help="zoo:NAME (e.g. zoo:lenet5) or file.py:attr (a PyTorch model).")],
    data: Annotated[str, typer.Option("--data", help="Training data: an .npz with x_train/y_train/x_test/y_test (e.g. ../shared/data/mnist.npz).")],
    output: Annotated[str, typer.Option("-o", "--output", help="Labels file to write (.npz); rewritten after every round.")],
    rounds: Annotated[int, typer.Option("--rounds", help="Pruning rounds R.")] = 10,
    rate: Annotated[float, typer.Option("--rate", help="Fraction P of the surviving weights pruned per round.")] = 0.2,
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs per round.")] = 1,
    prune_by: Annotated[str, typer.Option("--prune-by", help="Round score: magnitude (|w|) or snip (|w * dL/dw|).")] = "magnitude",
    seed: Annotated[int, typer.Option("--seed", help="Init seed (zoo models), data order and prune batch.")] = 0,
    lr: Annotated[float, typer.Option("--lr", help="SGD learning rate (momentum 0.9).")] = 0.01,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="SGD weight decay.")] = 5e-4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training batch size.")] = 128,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Train on the first N training samples only.")] = None,
    limit_test: Annotated[Optional[int], typer.Option("--limit-test", help="Evaluate on the first N test samples only.")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Samples per class of the prune batch (init gradient, SNIP).")] = 10,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads (default: torch's choice).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run stored in the output file.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Iterative rewind pruning of MODEL: per-weight init value, init gradient and rounds survived."""
    with guard(debug):
        from pai_compiler.lab.autosparse_collect import CollectConfig, collect
        from pai_compiler.io import check_output_path

        out = check_output_path(output, [data], force=False)
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        cfg = CollectConfig(model=model, data=data, rounds=rounds, rate=rate, epochs=epochs, prune_by=prune_by, seed=seed, lr=lr,
                            weight_decay=weight_decay, batch_size=batch_size, limit=limit, limit_test=limit_test, samples=samples, device=device)
        console = _stdout_console()
        labels = collect(cfg, out, resume=resume, progress=not quiet, console=console)
        if not quiet:
            import numpy as np

            counts = ", ".join(f"{r}: {c:,}" for r, c in enumerate(np.bincount(labels.survived, minlength=labels.rounds_done + 1)))
            console.print(f"{labels.w0.size:,} weights in {len(labels.layers)} layers; rounds survived -> count: {counts}")
            console.print(f"wrote {out} ({labels.rounds_done} rounds, {labels.meta.get('seconds', 0):.0f} s)")


@autosparse_app.command("train")
def autosparse_train(
    labels: Annotated[list[str], typer.Argument(help="Labels files from `paic autosparse collect`.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Predictor file to write (.npz).")],
    features: Annotated[str, typer.Option("--features", help="Comma-separated features (w, g, wg, abs_w, abs_g, abs_wg, log_fan_in, log_fan_out, log_numel, is_conv).")] = "w,g,wg,abs_w,abs_g,abs_wg,log_numel",
    standardize: Annotated[str, typer.Option("--standardize", help="layer (divide each signal by its layer's RMS) or none (raw values).")] = "layer",
    hidden: Annotated[str, typer.Option("--hidden", help="Hidden widths of the MLP, e.g. 32,32.")] = "32,32",
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs.")] = 20,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate (cosine decay).")] = 3e-3,
    max_per_layer: Annotated[int, typer.Option("--max-per-layer", help="Sample at most N weights per layer for training.")] = 50_000,
    split: Annotated[str, typer.Option("--split", help="Held-out split: layer (every 4th layer from the 2nd), file (the last file), or auto.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Fit the AutoSparse predictor on LABELS and report its error on a held-out split."""
    with guard(debug):
        from pai_compiler.lab.autosparse_collect import LabelSet
        from pai_compiler.passes.criteria.autosparse.predictor import train_predictor
        from pai_compiler.errors import UsageError
        from pai_compiler.io import check_output_path

        out = check_output_path(output, list(labels), force=False)
        try:
            widths = tuple(int(h) for h in hidden.split(",") if h.strip())
        except ValueError:
            raise UsageError(f"--hidden must be comma-separated integers such as 32,32, got {hidden!r}") from None
        sets = [LabelSet.load(path) for path in labels]
        console = _stdout_console()
        predictor, doc = train_predictor(
            sets, features=[f.strip() for f in features.split(",") if f.strip()], standardize=standardize, hidden=widths, epochs=epochs,
            lr=lr, max_per_layer=max_per_layer, split=split, seed=seed, sources=[str(p) for p in labels],
            on_epoch=None if quiet else lambda e, loss: console.print(f"epoch {e:3d}/{epochs}  train MSE {loss:.5f}"),
        )
        predictor.save(out)
        if not quiet:
            held = doc["heldout"]
            console.print(f"held-out split by {doc['split']}: {', '.join(doc['heldout_groups'])} ({held['weights']:,} weights)")
            console.print(f"held-out MSE {held['mse']:.4f} (constant baseline {held['baseline_mse']:.4f}), MAE {held['mae']:.4f}, "
                          f"Spearman {held['spearman']:.3f}, top recall {held['top_recall']:.3f}; train MSE {doc['train']['mse']:.4f}")
            console.print(f"wrote {out} ({predictor.num_parameters:,} parameters, {Path(out).stat().st_size:,} bytes, {doc['seconds']:.1f} s)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
