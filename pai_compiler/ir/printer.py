"""Stable text form of a Graph, for golden tests and ``--print-ir-after-all``.

One line per node: ``%out: dtype[shape] = kind(%in, ...) {attrs} [param: shape kept/total]``.
Attributes are printed sorted by key so the text does not depend on insertion order.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pai_compiler.ir.core import Graph
from pai_compiler.ir.nodes import Dim, Node

__all__ = ["to_text", "format_shape"]


def format_shape(shape: tuple[Dim, ...] | None) -> str:
    if shape is None:
        return "?"
    return "[" + ",".join(str(d) for d in shape) + "]"


def _format_attr(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"array{list(value.shape)}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_attr(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _node_line(node: Node) -> str:
    outs = ", ".join(f"%{v.name}: {v.dtype}{format_shape(v.shape)}" for v in node.outputs)
    ins = ", ".join(f"%{v.name}" for v in node.inputs)
    text = f"{outs} = {node.kind.value}({ins})" if outs else f"{node.kind.value}({ins})"
    if node.attrs:
        text += " {" + ", ".join(f"{k}={_format_attr(node.attrs[k])}" for k in sorted(node.attrs)) + "}"
    if node.params:
        parts = []
        for key in sorted(node.params):
            p = node.params[key]
            tag = f" kept {p.kept()}/{p.numel}" if p.prunable else ""
            parts.append(f"{key}: {p.name}{list(p.shape)}{tag}")
        text += " [" + "; ".join(parts) + "]"
    return text


def to_text(graph: Graph) -> str:
    """Render ``graph`` as deterministic text (the same graph always prints the same)."""
    lines = [f"graph {graph.name} {{"]
    lines += [f"  {_node_line(n)}" for n in graph.nodes]
    lines.append("}")
    return "\n".join(lines) + "\n"
