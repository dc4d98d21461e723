"""What every ``paic`` command shares: the typer app, the error guard (one line, exit codes),
the consoles, and the flag checks used by more than one command.

Exit codes: 0 ok, 1 model/processing error (one line on stderr, no traceback unless
``--debug``), 2 usage error. Heavy modules (torch, onnx, onnxruntime, rich) are imported inside
the functions, so ``paic --help`` stays fast.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pai_compiler._version import __version__

__all__ = ["app", "guard", "stdout_console", "stderr_console", "parse_float_flag", "parse_align_flag", "check_auto_output",
           "write_report", "checked_report_path", "torch_options", "QUIET_HELP", "QUIET_RESULT_HELP"]

QUIET_HELP = "Print nothing but errors (no progress bars, no summary)."
QUIET_RESULT_HELP = "No progress bars (the result itself still prints)."

app = typer.Typer(
    name="paic",
    help="paic — the Pruning-at-Initialization Compiler: analyse and prune ONNX/PyTorch models before training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



def stderr_console() -> Any:
    """A rich console on stderr (errors, notes)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def stdout_console() -> Any:
    """A rich console on stdout (tables, summaries)."""
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
        stderr_console().print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)
        raise typer.Exit(code=exc.exit_code) from None
    except OSError as exc:  # disk full, permission denied...: the user's environment, not a bug
        if debug:
            raise
        from rich.markup import escape

        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        stderr_console().print(f"[bold red]error:[/] {escape(exc.strerror or str(exc))}{escape(where)}")
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        stderr_console().print("interrupted")
        raise typer.Exit(code=130) from None
    except Exception as exc:
        if debug:
            raise
        from rich.markup import escape

        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        stderr_console().print(f"[bold red]internal error:[/] {escape(message)} (rerun with --debug for a traceback)")
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


def parse_float_flag(name: str, value: Optional[str]) -> Optional[float]:
    """A float flag given as text (None stays None); a usage error names the flag otherwise."""
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



def parse_align_flag(value: str | int, flag: str = "--align") -> Optional[int]:
    """``--align``: a positive integer N, or None for ``auto``; a usage error names the flag
    otherwise (string checks only: a usage error never waits for torch)."""
    from pai_compiler import api
    from pai_compiler.errors import UsageError

    text = str(value).strip().lower()
    if text == "auto":
        return None
    try:
        align = int(text)
    except ValueError:
        raise UsageError(f"{flag} must be a positive integer or 'auto', got {value!r}") from None
    if align < 1:
        raise UsageError(f"{flag} must be a positive integer or 'auto', got {value!r}")
    api.check_align(align)
    return align


def check_auto_output(align: Optional[int], out: Path) -> None:
    """``--align auto`` times compact ONNX candidates: a usage error for any other output."""
    from pai_compiler import api
    from pai_compiler.errors import UsageError

    if align is None and api.output_suffix(out) != ".onnx":
        raise UsageError(f"--align auto picks the fastest compact ONNX model; {out} is not .onnx: use -o X.onnx, or a number "
                         "(-o X.pt already runs each layer dense or sparse, whichever is faster)")



def write_report(report_path: Optional[Path], doc: dict[str, Any]) -> None:
    """Write the JSON report atomically (nothing without ``--report``)."""
    if report_path is None:
        return
    from pai_compiler.io import atomic_write

    with atomic_write(report_path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")


def checked_report_path(report: Optional[str], out: Path, inputs: list[str], *, force: bool) -> Optional[Path]:
    """The checked ``--report`` path: never the model input (without --force) nor the model output."""
    if report is None:
        return None
    from pai_compiler.errors import UsageError
    from pai_compiler.io import check_output_path

    path = check_output_path(report, inputs, force=force)
    if path.resolve() == out.resolve():
        raise UsageError(f"--report {report} is the output model's path: give the report its own file")
    return path


def split_timing_shape(input_shape: Optional[list[str]], *, onnx_model: bool,
                       compact: bool) -> tuple[Optional[list[str]], Optional[tuple[int, ...]]]:
    """optimize's ``--input-shape`` as (a PyTorch model's example input, the timing shape): for an ONNX
    model with ``--compact`` it is the first input's full shape the .pt kernels or the ``--align auto``
    candidates are timed at (one positional value); otherwise it stays the torch frontend's."""
    from pai_compiler.errors import UsageError

    if not input_shape or not onnx_model or not compact:
        return input_shape, None
    if len(input_shape) != 1 or "=" in input_shape[0] or ":" in input_shape[0]:
        raise UsageError("with an ONNX model and --compact, --input-shape is the first input's full shape to time at, "
                         f"batch first, e.g. 1,128 (one value, no NAME= or :DTYPE); got {' '.join(input_shape)!r}")
    from pai_compiler.bench import parse_shape  # imports torch: only with the flag, and before the run

    return None, parse_shape(input_shape[0])  # a malformed shape is a usage error now, not after pruning


def torch_options(input_shape: Optional[list[str]], frontend: str, *, prune_tied: bool = False) -> dict[str, Any]:
    """load_model options for a file.py:attr spec (an ONNX model refuses the torch-only ones)."""
    from pai_compiler.errors import UsageError

    if frontend not in ("auto", "fx", "export"):
        raise UsageError(f"--frontend must be auto, fx or export, got {frontend!r}")
    return {"input_shape": input_shape or None, "frontend": frontend, "prune_tied": prune_tied}
