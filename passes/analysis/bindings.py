"""Symbol bindings of a graph's dims: ``--bind`` text, one-sample bindings, a model's static batch.

A path count is per sample: every symbol of the graph is bound (to the user's value, else 1)
and the leading (batch) dim of every graph input is 1 whatever the user binds. A model
exported with a fixed batch B > 1 (every input and output leads with the same static B) runs
as is, and its counts are divided by B (``static_batch``).
"""
from __future__ import annotations

from collections.abc import Mapping


from pai_compiler.errors import UsageError
from pai_compiler.ir import Graph
from pai_compiler.ir.dims import is_symbolic

__all__ = ["parse_bind", "sample_bindings", "static_batch"]


def parse_bind(text: str | Mapping[str, int] | None) -> dict[str, int]:
    """``"batch=32,seq=197"`` -> ``{"batch": 32, "seq": 197}`` (a mapping passes through)."""
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return {str(k): int(v) for k, v in text.items()}
    out: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, eq, raw = item.partition("=")
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if not eq or not name.strip().isidentifier() or value < 1:
            raise UsageError(f"bad binding {item!r}: expected NAME=POSITIVE_INT, e.g. batch=32,seq=197")
        out[name.strip()] = value
    return out


def sample_bindings(graph: Graph, bind: Mapping[str, int] | None = None) -> dict[str, int]:
    """Every symbol of the graph bound (``bind``'s value, default 1); the leading dim of each input is 1 (one sample)."""
    symbols: set[str] = {str(s) for s in graph.meta.get("symbols", {})}
    batch: set[str] = set()
    for v in graph.inputs:
        for i, d in enumerate(v.shape or ()):
            if is_symbolic(d):
                names = {s.name for s in d.free_symbols}
                symbols |= names
                if i == 0:
                    batch |= names
    given = bind or {}
    return {name: 1 if name in batch else int(given.get(name, 1)) for name in symbols}


def static_batch(graph: Graph) -> int:
    """B when every graph input and output leads with the same static dim B > 1, else 1."""
    leads = [v.shape[0] if v.shape else None for v in (*graph.inputs, *graph.outputs)]
    first = leads[0] if leads else None
    if isinstance(first, int) and first > 1 and all(type(d) is int and d == first for d in leads):
        return first
    return 1
