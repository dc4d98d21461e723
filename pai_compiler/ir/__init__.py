"""The paic IR: Graph, Node, Value, Param, OpKind, its text printer and parser, and a graph builder."""
from __future__ import annotations

from pai_compiler.ir.builder import GraphBuilder
from pai_compiler.ir.core import Graph
from pai_compiler.ir.nodes import WEIGHTED_KINDS, Dim, Node, OpKind, Param, Value
from pai_compiler.ir.parser import IRSyntaxError, parse
from pai_compiler.ir.printer import format_shape, to_text

__all__ = ["Dim", "Graph", "GraphBuilder", "IRSyntaxError", "Node", "OpKind", "Param", "Value", "WEIGHTED_KINDS", "format_shape", "parse", "to_text"]
