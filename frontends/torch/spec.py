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
from pathlib import Path
from typing import Any

from pai_compiler.errors import ModelError, UsageError
from pai_compiler.ir import Graph

__all__ = ["load_torch_spec", "load_torch_module", "parse_input_shape", "split_spec", "FRONTENDS"]

FRONTENDS = ("fx", "export")


def split_spec(spec: str) -> tuple[Path, str]:
    """``"dir/models.py:ResNet20"`` -> (path, attribute)."""
    path, sep, attr = str(spec).rpartition(":")
    if not sep or not path.endswith(".py") or not attr:
        raise UsageError(f"model spec {spec!r} must look like file.py:attr (e.g. my_models.py:ResNet20)")
    return Path(path), attr


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
            raise UsageError(f"--input-shape must be comma-separated integers such as 2,3,32,32, got {value!r}") from None
    else:
        dims = tuple(int(d) for d in value)
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape must be positive integers with the batch first (e.g. 2,3,32,32), got {value!r}")
    return dims


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
    import torch
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


def load_torch_spec(spec: str, input_shape: str | Sequence[int] | None = None, frontend: str = "fx", *,
                    prune_in_proj: bool = True, **_: Any) -> Graph:
    """Lower ``file.py:attr`` with the fx (default) or torch.export frontend at ``input_shape``."""
    import torch

    if frontend not in FRONTENDS:
        raise UsageError(f"--frontend must be one of {', '.join(FRONTENDS)}, got {frontend!r}")
    shape = parse_input_shape(input_shape)
    if shape is None:
        raise UsageError(f"{spec} is a PyTorch model: give its input shape with --input-shape, batch first (e.g. --input-shape 2,3,32,32)")
    module = load_torch_module(spec)
    if frontend == "fx":
        from pai_compiler.frontends.torch.fx import lower_fx as lower
    else:
        from pai_compiler.frontends.torch.export import lower_export as lower
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    try:
        graph = lower(module, example, name=split_spec(spec)[1], prune_in_proj=prune_in_proj)
    except ModelError as first:
        # a model that starts with nn.Embedding reads integer indices: retry with valid ones
        entries = [m.num_embeddings for m in module.modules() if isinstance(m, torch.nn.Embedding)]
        if not entries:
            raise
        example = torch.randint(0, min(entries), shape, generator=torch.Generator().manual_seed(0))
        try:
            graph = lower(module, example, name=split_spec(spec)[1], prune_in_proj=prune_in_proj)
        except ModelError:
            raise first from None  # integer indices did not help: the float input's error is the cause
    graph.meta.update(torch_spec=str(spec), input_shape=list(shape))
    return graph
