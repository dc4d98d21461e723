"""``file.py:attr`` model specs: import a Python file, build the module, lower it to the IR.

``attr`` (dotted names allowed) may be an ``nn.Module`` subclass (instantiated with no
arguments under ``torch.manual_seed(0)``), a factory function (called with no arguments,
seeded the same way) or an ``nn.Module`` instance. The file is imported under a private
module name with its folder on ``sys.path`` (so it can import its neighbours). The example
input is ``randn(input_shape)``; when that fails on a model with ``nn.Embedding`` layers it is
integer indices (``randint`` below the smallest table's size) instead. Every
failure is a one-line ``PaicError``/``ModelError``/``UsageError``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pai_compiler.errors import ModelError, UsageError
from pai_compiler.ir import Graph
from pai_compiler.progress import Phases, metric_bar

__all__ = ["load_torch_spec", "load_torch_module", "lower_module", "parse_input_shape", "parse_input_specs", "split_spec",
           "InputSpec", "FRONTENDS"]

FRONTENDS = ("auto", "fx", "export")
#: a module with at least this many parameters shows its trace on a bar (``progress=True``): tracing
#: is one long call, so the bar is drawn from the start instead of after a delay (ResNet-18 has 11.7 M)
TRACE_BAR_PARAMS = 5_000_000


def split_spec(spec: str) -> tuple[Path, str]:
    """``"dir/models.py:ResNet20"`` -> (path, attribute)."""
    path, sep, attr = str(spec).rpartition(":")
    if not sep or not path.endswith(".py") or not attr:
        raise UsageError(f"model spec {spec!r} must look like file.py:attr (e.g. my_models.py:ResNet20)")
    return Path(path), attr


@dataclass(frozen=True)
class InputSpec:
    """One example input from ``--input-shape``: its argument name (None = positional), shape and dtype."""

    name: str | None
    shape: tuple[int, ...]
    dtype: str | None  # None: float32, retried as embedding indices when floats fail


def parse_input_shape(value: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``"2,3,32,32"`` (or ``2x3x32x32``, or a sequence) -> (2, 3, 32, 32)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.replace(" ", "").strip("()[]")
        parts = [p for p in (text.split(",") if "," in text else text.split("x")) if p]
        try:
            dims = tuple(int(p) for p in parts)
        except ValueError:
            raise UsageError(f"--input-shape must be comma-separated integers such as 2,3,32,32 or NAME=2,24:int64, got {value!r}") from None
    else:
        dims = tuple(int(d) for d in value)
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape must be positive integers with the batch first (e.g. 2,3,32,32), got {value!r}")
    return dims


def parse_input_specs(values: str | Sequence[str] | Sequence[int] | None) -> list[InputSpec]:
    """``--input-shape`` values -> InputSpecs: ``2,3,32,32`` (positional, float32) or
    ``NAME=2,24:int64`` (a keyword argument; ``:DTYPE`` on either form, default float32)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    if all(isinstance(v, int) for v in values):
        return [InputSpec(None, parse_input_shape(values) or (), None)]  # type: ignore[arg-type]
    specs: list[InputSpec] = []
    for text in values:
        text = str(text).strip()
        name, _, rest = text.rpartition("=")
        shape_text, _, dtype = rest.partition(":")
        if name and not name.isidentifier():
            raise UsageError(f"--input-shape {text!r}: {name!r} is not an argument name (use NAME=2,24:int64)")
        if dtype and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise UsageError(f"--input-shape {text!r}: unknown dtype {dtype!r} (use e.g. float32, int64, bool)")
        if specs and specs[-1].name is not None and not name:
            raise UsageError(f"--input-shape {text!r}: positional shapes come before NAME=... ones")
        specs.append(InputSpec(name or None, parse_input_shape(shape_text) or (), dtype or None))
    names = [s.name for s in specs if s.name]
    if len(set(names)) != len(names):
        raise UsageError(f"--input-shape names an argument twice ({', '.join(sorted(n for n in set(names) if names.count(n) > 1))})")
    return specs


def _import_file(path: Path) -> Any:
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a directory, expected a .py file")
    resolved = path.resolve()
    name = f"paic_user_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ModelError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(resolved.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        line = " ".join(str(exc).split())[:200]
        raise ModelError(f"{path}: import failed: {type(exc).__name__}: {line}") from None
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    return module


def load_torch_module(spec: str) -> Any:
    """Import ``file.py:attr`` and return the ``nn.Module`` it names (built if needed)."""
    from torch import nn

    path, attr = split_spec(spec)
    module = _import_file(path)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n, v in vars(module).items() if not n.startswith("_") and (inspect.isclass(v) and issubclass(v, nn.Module) or inspect.isfunction(v) or isinstance(v, nn.Module)))
            hint = f" (candidates: {', '.join(public[:8])})" if public else ""
            raise ModelError(f"{path} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if inspect.isclass(obj) and not issubclass(obj, nn.Module):
        raise ModelError(f"{spec}: {obj.__name__} is a class but not a torch.nn.Module")
    if not callable(obj):
        raise ModelError(f"{spec}: not an nn.Module, a Module class or a factory function (got {type(obj).__name__})")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            built = obj()
    except TypeError as exc:
        raise ModelError(f"{spec}: cannot be called without arguments ({' '.join(str(exc).split())})") from None
    except Exception as exc:
        raise ModelError(f"{spec}: building the model failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(built, nn.Module):
        raise ModelError(f"{spec}: returned a {type(built).__name__}, not an nn.Module")
    return built


def load_torch_spec(spec: str, input_shape: str | Sequence[str] | Sequence[int] | None = None, frontend: str = "auto", *,
                    prune_in_proj: bool = True, prune_tied: bool = False, progress: bool = False, **_: Any) -> Graph:
    """Lower ``file.py:attr`` at the ``--input-shape`` example (see :func:`parse_input_specs`) with ``frontend``;
    ``progress``: a module of ``TRACE_BAR_PARAMS`` parameters or more shows the trace phases on a bar (terminals only)."""
    specs = parse_input_specs(input_shape)
    if not specs:
        raise UsageError(f"{spec} is a PyTorch model: give its input shape with --input-shape, batch first "
                         "(e.g. --input-shape 2,3,32,32, or --input-shape input_ids=2,24:int64 per named input)")
    check_frontend(frontend)
    module = load_torch_module(spec)
    name = split_spec(spec)[1]
    options = {"name": name, "prune_in_proj": prune_in_proj, "prune_tied": prune_tied}
    big = sum(p.numel() for p in module.parameters()) >= TRACE_BAR_PARAMS
    with metric_bar(progress and big, f"[bold]load[/] {name}", len(FRONTENDS) - 1, unit="traces") as bar:
        phases = Phases(bar, len(FRONTENDS) - 1)
        try:
            graph = lower_module(module, _example(module, specs, integer=False), frontend, phases=phases, **options)
        except ModelError:
            # a model that starts with nn.Embedding reads integer indices: retry with valid ones
            if any(s.dtype is not None for s in specs) or _index_bound(module) is None:
                raise
            phases.begin("retrying with integer indices")
            graph = lower_module(module, _example(module, specs, integer=True), frontend, phases=phases, **options)  # its own error, if any
        phases.finish(f"{len(graph.nodes):,} IR nodes ({graph.meta.get('frontend', frontend)})")
    graph.meta.update(torch_spec=str(spec), input_shape=list(specs[0].shape))
    return graph


def check_frontend(frontend: str) -> None:
    """Usage error unless ``frontend`` is auto, fx or export."""
    if frontend not in FRONTENDS:
        raise UsageError(f"--frontend must be one of {', '.join(FRONTENDS)}, got {frontend!r}")


def lower_module(module: Any, example: Any, frontend: str = "auto", *, phases: Phases | None = None, **options: Any) -> Graph:
    """Lower an ``nn.Module`` with torch.fx, torch.export, or (``auto``) fx and then export if fx fails.

    The graph's ``meta["frontend"]`` names the one used; under ``auto`` a fallback is noted in
    its warnings with fx's reason, and a double failure reports both. ``phases``: a progress feed
    told which trace runs (one unit per frontend tried).
    """
    from pai_compiler.frontends.torch.export import lower_export
    from pai_compiler.frontends.torch.fx import EXPORT_HINT, lower_fx

    phases = phases or Phases(None, 0)
    check_frontend(frontend)
    if frontend == "export":
        phases.begin("tracing with torch.export")
        return lower_export(module, example, **options)
    try:
        phases.begin("tracing with torch.fx")
        return lower_fx(module, example, **options)
    except ModelError as fx_error:
        if frontend == "fx":
            raise
        fx_reason = str(fx_error).removesuffix(EXPORT_HINT)
    phases.tick()
    phases.begin("tracing with torch.export (torch.fx failed)")
    try:
        graph = lower_export(module, example, **options)
    except ModelError as export_error:
        raise ModelError(f"neither frontend lowers {type(module).__name__}: torch.fx: {fx_reason}; torch.export: {export_error}; "
                         "the ONNX route may: export it with torch.onnx.export and give paic the .onnx file") from export_error
    graph.meta["warnings"].insert(0, f"lowered with torch.export (--frontend auto; torch.fx failed: {fx_reason})")
    return graph


def _index_bound(module: Any) -> int | None:
    """The smallest ``nn.Embedding`` table size: integer example inputs stay below it (None: no embedding)."""
    sizes = [m.num_embeddings for m in module.modules() if isinstance(m, torch.nn.Embedding)]
    return min(sizes) if sizes else None


def _example(module: Any, specs: list[InputSpec], *, integer: bool) -> Any:
    """Seeded example tensors: N(0, 1) floats, valid embedding indices for integer dtypes, all-true bools."""
    generator = torch.Generator().manual_seed(0)
    bound = _index_bound(module) or 2

    def tensor(s: InputSpec) -> torch.Tensor:
        dtype = getattr(torch, s.dtype) if s.dtype else (torch.int64 if integer else torch.float32)
        if dtype == torch.bool:
            return torch.ones(s.shape, dtype=torch.bool)
        if dtype.is_floating_point or dtype.is_complex:
            return torch.randn(s.shape, generator=generator).to(dtype)
        return torch.randint(0, bound, s.shape, generator=generator).to(dtype)

    positional = tuple(tensor(s) for s in specs if s.name is None)
    named = {s.name: tensor(s) for s in specs if s.name is not None}
    if named:
        return {**dict(zip(_positional_names(module, len(positional)), positional)), **named}
    return positional[0] if len(positional) == 1 else positional


def _positional_names(module: Any, count: int) -> list[str]:
    names = [p.name for p in inspect.signature(module.forward).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(names) < count:
        raise UsageError(f"--input-shape gives {count} positional inputs; {type(module).__name__}.forward takes {len(names)}")
    return names[:count]
