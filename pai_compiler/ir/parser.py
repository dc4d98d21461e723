"""Read the printer's text back into a Graph: ``to_text(parse(to_text(g))) == to_text(g)``.

The grammar is the printer's (``pai_compiler/ir/printer.py``)::

    graph NAME {
      %out: dtype[shape], ... = kind(%in, ...) {key=value, ...} [key: param[shape] kept k/n; ...]
      output(%value)
    }

What the text carries comes back: value names, dtypes and shapes (``?`` = unknown; symbolic
dims such as ``batch`` or ``4*batch`` become positive-integer sympy symbols, as the frontends
make them), node kinds and inputs, attributes, and for every param its name, shape, whether it
is prunable (it prints ``kept``) and how many weights its mask keeps. What the text does not
carry cannot come back, and the parsed graph is a *structural* copy:

- weight values (params are ones; a prunable param's mask keeps its first ``k`` weights in
  flat order, a dense one has no mask), a param's channel axes (``out_axis=0, in_axis=1``)
  and ``origin``, node names (a node is named after its first output; an output node
  ``out``), node origins and ``graph.meta``;
- attribute types the printer folds together: tuples come back as lists, an ``array[2, 3]``
  as a float32 zero array of that shape, a string that looks like a number as that number;
  a bare word inside a list is a sympy symbol when it names a dim of the graph, else a string.

The printer does not quote names, so a graph, value or param name with a space, ``", "`` or
``"; "`` in it, or a string attribute with ``", "`` in it, does not parse back.

Prunable params that share a name are one tied Param (a weight read by several nodes);
non-prunable params are one copy per use (exporters de-duplicate equal constants by name).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from pai_compiler.errors import ModelError, PaicError
from pai_compiler.ir.core import Graph
from pai_compiler.ir.dims import dim_symbol, sym
from pai_compiler.ir.nodes import Dim, OpKind, Param, Value

__all__ = ["IRSyntaxError", "parse"]

_HEADER = re.compile(r"^graph (?P<name>\S+) \{$")
_OUTPUT = re.compile(r"^%(?P<name>.+?): (?P<dtype>[A-Za-z0-9_]+)(?P<shape>\?|\[.*\])$")
_CALL = re.compile(r"^(?P<kind>[a-z_]+)\((?P<args>[^()]*)\)(?P<rest>.*)$")
_PARAM = re.compile(r"^(?P<key>[^:]+): (?P<name>.+)\[(?P<shape>[0-9, ]*)\](?: kept (?P<kept>\d+)/(?P<total>\d+))?$")
_INT = re.compile(r"^-?\d+$")
_FLOAT = re.compile(r"^-?(\d+\.\d*(e[-+]?\d+)?|\d+e[-+]?\d+|inf|nan)$")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# sympy's printer writes these function names inside symbolic dims; every other word is a dim symbol
_SYMPY_FUNCTIONS = ("Max", "Min", "floor", "ceiling", "Mod", "Abs")


class IRSyntaxError(ModelError):
    """The text is not what ``to_text`` prints; the message names the line."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


@dataclass
class _ParamSpec:
    """One ``key: name[shape] kept k/n`` entry of a node line."""

    key: str
    name: str
    shape: tuple[int, ...]
    kept: int | None  # None: not prunable


class _Parser:
    """Builds the graph line by line; owns the symbol table and the tied-param table."""

    def __init__(self) -> None:
        self.graph = Graph()
        self.symbols: dict[str, Any] = {}  # name -> sympy Symbol
        self.tied: dict[str, Param] = {}
        self.line = 0

    def fail(self, message: str) -> IRSyntaxError:
        return IRSyntaxError(self.line, message)

    # ---- shapes and attribute values -------------------------------------------------------
    def dim(self, text: str) -> Dim:
        text = text.strip()
        if _INT.match(text):
            return int(text)
        names = {w: self.symbol(w) for w in _IDENTIFIER.findall(text) if w not in _SYMPY_FUNCTIONS}
        sympy = sym()
        functions = {f: getattr(sympy, f) for f in _SYMPY_FUNCTIONS}
        try:
            return sympy.sympify(text, locals={**functions, **names})
        except (sympy.SympifyError, SyntaxError, TypeError) as exc:
            raise self.fail(f"bad dimension {text!r}") from exc

    def symbol(self, name: str) -> Any:
        if name not in self.symbols:
            self.symbols[name] = dim_symbol(name)
        return self.symbols[name]

    def shape(self, text: str) -> tuple[Dim, ...] | None:
        if text == "?":
            return None
        if not (text.startswith("[") and text.endswith("]")):
            raise self.fail(f"bad shape {text!r} (expected [d,...] or ?)")
        return tuple(self.dim(d) for d in _split_top(text[1:-1], ",", self)) if text != "[]" else ()

    def attr_value(self, text: str, in_list: bool = False) -> Any:
        text = text.strip()
        if text.startswith("array[") and text.endswith("]"):
            return np.zeros(tuple(int(d) for d in _split_top(text[6:-1], ",", self) if d.strip()), np.float32)
        if text.startswith("[") and text.endswith("]"):
            inner = text[1:-1]
            return [self.attr_value(v, in_list=True) for v in _split_top(inner, ",", self)] if inner.strip() else []
        if _INT.match(text):
            return int(text)
        if _FLOAT.match(text.lower()):
            return float(text)
        if text in ("True", "False"):
            return text == "True"
        if text == "None":
            return None
        words = _IDENTIFIER.findall(text)
        if in_list and words and all(w in self.symbols or w in _SYMPY_FUNCTIONS for w in words):
            return self.dim(text)
        return text

    # ---- one node line ----------------------------------------------------------------------
    def node_line(self, text: str) -> None:
        outputs_text, sep, call_text = text.partition(" = ")
        if not sep:
            outputs_text, call_text = "", text
        outputs = [self.output_spec(o) for o in _split_top(outputs_text, ",", self)] if outputs_text else []
        match = _CALL.match(call_text)
        if match is None:
            raise self.fail(f"expected kind(%input, ...), got {call_text!r}")
        try:
            kind = OpKind(match["kind"])
        except ValueError:
            raise self.fail(f"unknown op kind {match['kind']!r}") from None
        inputs = [self.input_value(a) for a in _split_top(match["args"], ",", self)] if match["args"].strip() else []
        attrs, specs = self.attrs_and_params(match["rest"])
        params = {spec.key: self.param(spec) for spec in specs}
        if kind is OpKind.CONV_TRANSPOSE and "weight" in params:  # the kind names its layout: (in, out/groups, k...)
            params["weight"].out_axis, params["weight"].in_axis = 1, 0
        name = self.graph.fresh_name(outputs[0][0] if outputs else "out")
        try:
            self.graph.add_node(kind, name, inputs, outputs, params=params, attrs=attrs)
        except PaicError as exc:  # the graph refused the node (a value defined twice, ...)
            raise self.fail(str(exc)) from None
        for spec in specs:
            param = params[spec.key]
            if spec.kept is not None and spec.kept < param.numel and param.mask is None:
                self.graph.set_mask(param, np.arange(param.numel).reshape(spec.shape) < spec.kept)

    def output_spec(self, text: str) -> tuple[str, tuple[Dim, ...] | None, str]:
        match = _OUTPUT.match(text.strip())
        if match is None:
            raise self.fail(f"expected %name: dtype[shape], got {text.strip()!r}")
        return match["name"], self.shape(match["shape"]), match["dtype"]

    def input_value(self, text: str) -> Value:
        text = text.strip()
        if not text.startswith("%"):
            raise self.fail(f"expected an input %name, got {text!r}")
        try:
            return self.graph.value(text[1:])
        except KeyError:
            raise self.fail(f"%{text[1:]} is used before it is defined") from None

    def attrs_and_params(self, rest: str) -> tuple[dict[str, Any], list[_ParamSpec]]:
        rest = rest.strip()
        attrs: dict[str, Any] = {}
        if rest.startswith("{"):
            end = _closing(rest, 0, self)
            for item in _split_top(rest[1:end], ",", self):
                key, eq, value = item.strip().partition("=")
                if not eq or not key:
                    raise self.fail(f"expected key=value in attributes, got {item.strip()!r}")
                attrs[key] = self.attr_value(value)
            rest = rest[end + 1 :].strip()
        if rest.startswith("[") and rest.endswith("]"):
            return attrs, [self.param_spec(item) for item in rest[1:-1].split("; ")]
        if rest:
            raise self.fail(f"unexpected text after the call: {rest!r}")
        return attrs, []

    def param_spec(self, text: str) -> _ParamSpec:
        match = _PARAM.match(text.strip())
        if match is None:
            raise self.fail(f"expected key: name[shape] kept k/n, got {text.strip()!r}")
        shape = tuple(int(d) for d in match["shape"].split(",") if d.strip())
        kept = None if match["kept"] is None else int(match["kept"])
        if kept is not None and (int(match["total"]) != int(np.prod(shape)) or kept > int(match["total"])):
            raise self.fail(f"param {match['name']!r}: kept {kept}/{match['total']} does not fit its shape {list(shape)}")
        return _ParamSpec(match["key"].strip(), match["name"], shape, kept)

    def param(self, spec: _ParamSpec) -> Param:
        tied = self.tied.get(spec.name)
        if spec.kept is not None and tied is not None and tied.shape == spec.shape and tied.kept() == spec.kept:
            return tied
        param = Param(spec.name, np.ones(spec.shape, np.float32), prunable=spec.kept is not None)
        if spec.kept is not None:
            self.tied.setdefault(spec.name, param)
        return param


def _closing(text: str, start: int, parser: _Parser) -> int:
    """Index of the bracket closing the one at ``start`` (brackets nest: () [] {})."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i
    raise parser.fail(f"unbalanced brackets in {text!r}")


def _split_top(text: str, sep: str, parser: _Parser) -> list[str]:
    """Split at ``sep`` outside any brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise parser.fail(f"unbalanced brackets in {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise parser.fail(f"unbalanced brackets in {text!r}")
    parts.append(text[start:])
    return parts


def parse(text: str) -> Graph:
    """Parse ``to_text`` output into a verified Graph; raise IRSyntaxError naming the bad line.

    Blank lines and ``//`` comments (as ``--print-ir-after-all`` writes) are skipped."""
    parser = _Parser()
    state = "header"  # header -> body -> done
    for number, raw in enumerate(text.splitlines(), start=1):
        parser.line = number
        line = raw.strip()
        if not line or line.startswith("//"):
            continue
        if state == "header":
            header = _HEADER.match(line)
            if header is None:
                raise parser.fail(f"expected 'graph NAME {{', got {line!r}")
            parser.graph.name, state = header["name"], "body"
        elif state == "done":
            raise parser.fail(f"text after the closing '}}': {line!r}")
        elif line == "}":
            state = "done"
        else:
            parser.node_line(line)
    if state != "done":
        raise parser.fail("missing " + ("'graph NAME {'" if state == "header" else "closing '}'"))
    try:
        parser.graph.verify()
    except PaicError as exc:
        raise parser.fail(str(exc)) from None
    parser.graph.version = 0
    return parser.graph
