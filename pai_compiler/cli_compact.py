"""``paic compact`` (dead-node elimination of a sparse ONNX model; ``.pt``: the sparse-execution
torch module; ``--align auto``: the fastest ONNX form) and ``paic bench`` (latency of .onnx/.pt
models side by side). Registered on the app by :mod:`pai_compiler.cli`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pai_compiler._version import __version__
from pai_compiler.cli_app import (
    QUIET_HELP, QUIET_RESULT_HELP, check_auto_output, checked_report_path, guard, parse_align_flag, stdout_console, write_report,
)
from pai_compiler.cli_output import audit_totals, compact_summary, render_compact_written, render_kept_dead
from pai_compiler.progress import bars_wanted

__all__ = ["compact", "bench"]


def compact(
    model: Annotated[str, typer.Argument(help="A sparse ONNX model (zero weights are taken as pruned).")],
    output: Annotated[str, typer.Option("-o", "--output", help="Output compact model (.onnx, or .pt for a torch module).")],
    report: Annotated[Optional[str], typer.Option("--report", help="Write the JSON report here.")] = None,
    align: Annotated[str, typer.Option("--align", help="Keep layer widths multiples of N (faster ORT kernels; still exact); 'auto' (-o X.onnx): compact at align 1, 4 and 8, time them and the masked model alternating in onnxruntime, write the fastest (the masked model unchanged if it wins).")] = "1",
    batch: Annotated[Optional[int], typer.Option("--batch", help="With -o X.pt or --align auto: the batch size the kernels/models are timed at (default 1).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="With -o X.pt or --align auto: torch/onnxruntime threads for that timing (default 1).")] = None,
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", help="With -o X.pt or --align auto: the first input's full shape to time at, batch first, e.g. 1,128 (binds symbolic dims such as seq).")] = None,
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
        align_value, shape = _check_compact_flags(out, align, batch, threads, device, input_shape)
        batch = shape[0] if shape is not None else batch
        report_path = checked_report_path(report, out, [model], force=force)
        progress = bars_wanted(quiet=quiet)
        graph = api.load_model(model, progress=progress)
        if graph.meta.get("source_format") != "onnx":
            raise UsageError("paic compact reads ONNX models; for PyTorch use `paic optimize --compact`")
        masks_from_zeros(graph)
        masked = audit_totals(graph, progress=progress)
        unsaved = len(graph.meta["warnings"])
        choice, compacted = _compact_at(graph, model, out, align_value, batch=batch or 1, threads=threads or 1, progress=progress,
                                        input_shape=shape)
        sparse_doc = None if choice else api.save_compact(graph, model, out, compacted, batch=batch or 1, threads=threads or 1, device=device,
                                                          progress=progress, input_shape=shape)
        # the frontend's warnings, then those the backend noted on the graph while writing
        warnings = [*dict.fromkeys(graph.meta["warnings"][:unsaved]), *graph.meta["warnings"][unsaved:]]
        doc = {"model": model, "output": str(out), "paic_version": __version__, **compact_summary(masked, graph, compacted),
               "warnings": warnings}
        if sparse_doc is not None:
            doc["sparse_exec"] = sparse_doc
        if choice is not None:
            doc["align_choice"] = choice.to_dict()
        write_report(report_path, doc)
        if not quiet:
            console = stdout_console()
            render_compact_written(console, doc, str(out))
            if sparse_doc is not None:
                from pai_compiler.bench import render_sparse_exec

                render_sparse_exec(console, sparse_doc)
            if explain:
                render_kept_dead(console, compacted)
            elif doc["params_after"] > 0.9 * doc["params_before"] and compacted.kept_dead_channels:
                console.print("little was removed: `paic compact --explain` lists what kept the dead channels")
            for w in doc["warnings"]:
                console.print(f"[yellow]warning:[/] {w}")


def _check_compact_flags(out: Path, align: str, batch: Optional[int], threads: Optional[int], device: str,
                         input_shape: Optional[str]) -> tuple[Optional[int], Optional[tuple[int, ...]]]:
    """``paic compact``'s usage checks, before any work; returns the alignment (None: ``--align auto``)
    and the parsed ``--input-shape``."""
    from pai_compiler import api
    from pai_compiler.errors import UsageError

    api.check_output_format(out, torch_source=False, compact=True)
    align_value = parse_align_flag(align)
    check_auto_output(align_value, out)
    torch_output = api.output_suffix(out) == ".pt"
    timed = batch is not None or threads is not None or input_shape is not None
    if not torch_output and (device != "cpu" or (align_value is not None and timed)):
        raise UsageError("--batch, --threads, --input-shape and --device time the kernels of a torch output: use -o FAST.pt "
                         "(or --align auto, which times ONNX candidates at --batch/--threads/--input-shape on the cpu)")
    for flag, value in (("--batch", batch), ("--threads", threads)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be a positive integer, got {value}")
    shape = None
    if input_shape is not None:
        from pai_compiler.bench import parse_shape  # imports torch: only with the flag

        shape = parse_shape(input_shape)
    if shape is not None and batch is not None and shape[0] != batch:
        raise UsageError(f"--batch {batch} contradicts --input-shape {input_shape} (batch first); give one of them")
    api.check_device(device)
    return align_value, shape


def _compact_at(graph: Any, model: str, out: Path, align: Optional[int], *, batch: int, threads: int, progress: bool,
                input_shape: Optional[tuple[int, ...]] = None) -> tuple[Any, Any]:
    """Compact ``graph`` in place at ``align``; None (``--align auto``) first writes the fastest form in onnxruntime to
    ``out`` and compacts at its alignment, or not at all when the masked model stayed. Returns (choice or None, report)."""
    from pai_compiler import api
    from pai_compiler.passes.transform.dead_node_elim import CompactReport

    if align is not None:
        return None, api.compact_graph(graph, align=align, progress=progress)
    from pai_compiler.align_choice import choose_align

    choice = choose_align(model, out, batch=batch, threads=threads, progress=progress, input_shape=input_shape)
    if choice.chosen is None:  # the masked model stayed: the summary says nothing was removed
        return choice, CompactReport()
    return choice, api.compact_graph(graph, align=choice.chosen, progress=progress)


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
            render_bench(stdout_console(), doc)
