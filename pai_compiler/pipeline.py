"""Parse and print pipeline strings: ``erk{sparsity=0.95},magnitude{scope=layer},flops``.

Grammar: ``pipeline := pass ("," pass)*``, ``pass := name ["{" opt ("," opt)* "}"]``,
``opt := key "=" value``. Values are coerced to the dataclass field's type (int, float,
bool, str, or ``X | None``); a quoted value ``"..."`` may hold commas and braces. Printing
writes the options that differ from their defaults, in field order, so a canonical string
prints back identically. Errors name the offending token and its position.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any

from pai_compiler.errors import UsageError

__all__ = ["parse_pipeline", "format_pipeline", "format_pass", "build_pass", "pass_options"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


def pass_options(cls: type) -> list[tuple[str, Any, Any]]:
    """(name, type, default) for each option of a pass class."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append((f.name, hints.get(f.name, str), default))
    return out


def _coerce(raw: str, typ: Any, where: str) -> Any:
    args = typing.get_args(typ)
    if type(None) in args:
        if raw.lower() in ("none", "null", ""):
            return None
        typ = next(a for a in args if a is not type(None))
        args = typing.get_args(typ)
    if typing.get_origin(typ) is typing.Literal:
        if raw not in args:
            raise UsageError(f"bad value {raw!r} for {where}: expected one of {', '.join(map(str, args))}")
        return raw
    try:
        if typ is bool:
            if raw.lower() in ("true", "1", "yes", "on"):
                return True
            if raw.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(raw)
        if typ is float:
            value = float(raw)
            if math.isnan(value):
                raise ValueError
            return value
    except ValueError:
        raise UsageError(f"bad value {raw!r} for {where}: expected {getattr(typ, '__name__', typ)}") from None
    return raw


def build_pass(name: str, options: dict[str, str]) -> Any:
    """Instantiate the registered pass ``name`` from string options."""
    from pai_compiler.registry import get_pass_class

    cls = get_pass_class(name)
    known = {n: t for n, t, _ in pass_options(cls)}
    kwargs = {}
    for key, raw in options.items():
        if key not in known:
            raise UsageError(f"unknown option {key!r} for pass {name!r} (options: {', '.join(known) or 'none'})")
        kwargs[key] = _coerce(raw, known[key], f"{name}.{key}")
    try:
        return cls(**kwargs)
    except UsageError:
        raise
    except (TypeError, ValueError) as exc:
        raise UsageError(f"pass {name!r}: {exc}") from None


def parse_pipeline(text: str) -> list[Any]:
    """Parse a pipeline string into pass instances."""
    passes: list[Any] = []
    pos, n = 0, len(text)

    def skip_ws() -> None:
        nonlocal pos
        while pos < n and text[pos].isspace():
            pos += 1

    skip_ws()
    if pos >= n:
        raise UsageError("empty pipeline")
    while True:
        skip_ws()
        m = _NAME.match(text, pos)
        if not m:
            raise UsageError(f"expected a pass name at position {pos}: {text[pos:pos + 20]!r}")
        name, pos = m.group(0), m.end()
        options: dict[str, str] = {}
        skip_ws()
        if pos < n and text[pos] == "{":
            pos += 1
            while True:
                skip_ws()
                if pos < n and text[pos] == "}":
                    pos += 1
                    break
                km = _NAME.match(text, pos)
                if not km:
                    raise UsageError(f"expected an option name in {name!r} at position {pos}: {text[pos:pos + 20]!r}")
                key, pos = km.group(0), km.end()
                skip_ws()
                if pos >= n or text[pos] != "=":
                    raise UsageError(f"expected '=' after option {key!r} of {name!r} at position {pos}")
                pos += 1
                skip_ws()
                if pos < n and text[pos] == '"':
                    end = text.find('"', pos + 1)
                    if end < 0:
                        raise UsageError(f"unterminated quoted value for {name}.{key} at position {pos}")
                    value, pos = text[pos + 1 : end], end + 1
                else:
                    start = pos
                    while pos < n and text[pos] not in ",}":
                        pos += 1
                    value = text[start:pos].strip()
                if key in options:
                    raise UsageError(f"option {key!r} given twice for {name!r}")
                options[key] = value
                skip_ws()
                if pos < n and text[pos] == ",":
                    pos += 1
                elif pos < n and text[pos] == "}":
                    pos += 1
                    break
                else:
                    raise UsageError(f"expected ',' or '}}' in options of {name!r} at position {pos}")
        passes.append(build_pass(name, options))
        skip_ws()
        if pos >= n:
            return passes
        if text[pos] != ",":
            raise UsageError(f"expected ',' between passes at position {pos}: {text[pos:pos + 20]!r}")
        pos += 1


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value) if isinstance(value, float) else str(value)
    return f'"{text}"' if any(c in text for c in ',{}" ') else text


def format_pass(pass_: Any) -> str:
    opts = []
    for name, _, default in pass_options(type(pass_)):
        value = getattr(pass_, name)
        if value != default:
            opts.append(f"{name}={_format_value(value)}")
    return type(pass_).name + ("{" + ",".join(opts) + "}" if opts else "")


def format_pipeline(passes: list[Any]) -> str:
    return ",".join(format_pass(p) for p in passes)
