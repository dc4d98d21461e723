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
from collections.abc import Sequence
from typing import Any

from pai_compiler.errors import UsageError
from pai_compiler.registry import get_pass_class

__all__ = ["parse_pipeline", "format_pipeline", "format_pass", "build_pass", "make_pass", "pass_options"]

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


def make_pass(name: str, **options: Any) -> Any:
    """Instantiate the registered pass ``name`` with typed options; the pass validates their values."""
    cls = get_pass_class(name)
    known = [option for option, _, _ in pass_options(cls)]
    for key in options:
        if key not in known:
            raise UsageError(f"unknown option {key!r} for pass {name!r} (options: {', '.join(known) or 'none'})")
    try:
        return cls(**options)
    except UsageError:
        raise
    except (TypeError, ValueError) as exc:
        raise UsageError(f"pass {name!r}: {exc}") from None


def build_pass(name: str, options: dict[str, str]) -> Any:
    """Instantiate the registered pass ``name`` from string options (as typed in a pipeline)."""
    known = {option: typ for option, typ, _ in pass_options(get_pass_class(name))}
    typed: dict[str, Any] = {}
    for key, raw in options.items():
        if key not in known:
            raise UsageError(f"unknown option {key!r} for pass {name!r} (options: {', '.join(known) or 'none'})")
        typed[key] = _coerce(raw, known[key], f"{name}.{key}")
    return make_pass(name, **typed)


def parse_pipeline(text: str) -> list[Any]:
    """Parse a pipeline string into pass instances."""
    return _PipelineParser(text).passes()


class _PipelineParser:
    """A cursor over pipeline text; each method consumes one grammar rule."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def passes(self) -> list[Any]:
        self.skip_space()
        if self.at_end():
            raise UsageError("empty pipeline")
        passes: list[Any] = []
        while True:
            self.skip_space()
            name = self.name("a pass name")
            self.skip_space()
            options = self.options(name) if self.peek() == "{" else {}
            passes.append(build_pass(name, options))
            self.skip_space()
            if self.at_end():
                return passes
            if self.peek() != ",":
                raise UsageError(f"expected ',' between passes at position {self.pos}: {self.excerpt()!r}")
            self.pos += 1

    def options(self, name: str) -> dict[str, str]:
        """``{key=value, ...}`` after the pass ``name`` (the cursor is on the ``{``)."""
        self.pos += 1
        options: dict[str, str] = {}
        while True:
            self.skip_space()
            if self.peek() == "}":  # also after a trailing comma: {a=1,}
                self.pos += 1
                return options
            key = self.name(f"an option name in {name!r}")
            self.skip_space()
            if self.peek() != "=":
                raise UsageError(f"expected '=' after option {key!r} of {name!r} at position {self.pos}")
            self.pos += 1
            self.skip_space()
            value = self.value(name, key)
            if key in options:
                raise UsageError(f"option {key!r} given twice for {name!r}")
            options[key] = value
            self.skip_space()
            separator = self.peek()
            if separator not in (",", "}"):
                raise UsageError(f"expected ',' or '}}' in options of {name!r} at position {self.pos}")
            self.pos += 1
            if separator == "}":
                return options

    def value(self, name: str, key: str) -> str:
        """A quoted value (may hold commas and braces) or the text up to the next ``,`` or ``}``."""
        if self.peek() == '"':
            end = self.text.find('"', self.pos + 1)
            if end < 0:
                raise UsageError(f"unterminated quoted value for {name}.{key} at position {self.pos}")
            value, self.pos = self.text[self.pos + 1 : end], end + 1
            return value
        start = self.pos
        while not self.at_end() and self.text[self.pos] not in ",}":
            self.pos += 1
        return self.text[start : self.pos].strip()

    def name(self, what: str) -> str:
        match = _NAME.match(self.text, self.pos)
        if not match:
            raise UsageError(f"expected {what} at position {self.pos}: {self.excerpt()!r}")
        self.pos = match.end()
        return match.group(0)

    def skip_space(self) -> None:
        while not self.at_end() and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        return "" if self.at_end() else self.text[self.pos]

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def excerpt(self) -> str:
        return self.text[self.pos : self.pos + 20]


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value) if isinstance(value, float) else str(value)
    return f'"{text}"' if any(c in text for c in ',{}" ') else text


def format_pass(pass_: Any) -> str:
    """``name{option=value,...}`` with the options that differ from their defaults, in field order."""
    opts = []
    for name, _, default in pass_options(type(pass_)):
        value = getattr(pass_, name)
        if value != default:
            opts.append(f"{name}={_format_value(value)}")
    return type(pass_).name + ("{" + ",".join(opts) + "}" if opts else "")


def format_pipeline(passes: Sequence[Any]) -> str:
    return ",".join(format_pass(p) for p in passes)
