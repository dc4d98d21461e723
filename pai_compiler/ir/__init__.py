"""The paic IR: Graph, Node, Value, Param, OpKind, and its text printer."""
from __future__ import annotations

from pai_compiler.ir.core import WEIGHTED_KINDS, Dim, Graph, Node, OpKind, Param, Value
from pai_compiler.ir.printer import format_shape, to_text

__all__ = ["Dim", "Graph", "Node", "OpKind", "Param", "Value", "WEIGHTED_KINDS", "format_shape", "to_text"]
