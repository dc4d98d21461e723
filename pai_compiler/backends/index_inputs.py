"""Whether a graph's input is embedding indices, and below which bound (the smallest table it indexes).

An exporter traces with, and a prune batch is drawn as, integers in ``[0, entries)`` for such a
model and as floats otherwise.
"""
from __future__ import annotations

from pai_compiler.ir import Graph

__all__ = ["input_index_entries"]


def input_index_entries(graph: Graph) -> int | None:
    """The smallest table size when the graph's first input is embedding indices (else None: floats)."""
    x = graph.inputs[0] if graph.inputs else None
    if x is None or x.dtype.startswith("float"):
        return None
    from pai_compiler.interp import index_lookups, indexes_lookups_only  # heavy: interp imports torch, which a float input never needs

    if not indexes_lookups_only(x):
        return None
    return min(int(n.params["table"].shape[int(n.attrs.get("axis", 0))]) for n in index_lookups(x))
