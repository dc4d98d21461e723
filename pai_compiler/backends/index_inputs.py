"""What each graph input holds: embedding indices (below the smallest table they index), a mask, or floats.

An exporter traces with, and a prune batch is drawn as, integers in ``[0, entries)`` for an
input that indexes embedding lookups, all ones for an integer input that indexes none (an
attention mask), and floats otherwise; :func:`role_array` draws such an array (the example
inputs of ``--data random``, ``paic bench`` and the sparse-kernel timing).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pai_compiler.ir import Graph, Value

__all__ = ["InputRole", "input_roles", "input_index_entries", "role_array"]

RoleKind = Literal["indices", "mask", "float"]


@dataclass(frozen=True)
class InputRole:
    """One graph input's role: ``indices`` (with the table bound ``entries``), ``mask`` (integer, all ones) or ``float``."""

    name: str
    kind: RoleKind
    dtype: str
    entries: int | None = None


def _role(x: Value) -> InputRole:
    if x.dtype.startswith(("float", "bfloat")):
        return InputRole(x.name, "float", x.dtype)
    from pai_compiler.interp_tables import index_lookups  # heavy: interp imports torch, which a float input never needs

    lookups = index_lookups(x)
    if not lookups:
        return InputRole(x.name, "mask", x.dtype)
    entries = min(int(n.params["table"].shape[int(n.attrs.get("axis", 0))]) for n in lookups)
    return InputRole(x.name, "indices", x.dtype, entries)


def input_roles(graph: Graph) -> list[InputRole]:
    """The role of every graph input, in order (a bool or integer input that picks no embedding row is a mask)."""
    return [_role(x) for x in graph.inputs]


def input_index_entries(graph: Graph) -> int | None:
    """The smallest table size when the graph's first input is embedding indices only (else None: floats)."""
    x = graph.inputs[0] if graph.inputs else None
    if x is None or x.dtype.startswith("float"):
        return None
    from pai_compiler.interp_tables import index_lookups, indexes_lookups_only  # heavy: interp imports torch, which a float input never needs

    if not indexes_lookups_only(x):
        return None
    return min(int(n.params["table"].shape[int(n.attrs.get("axis", 0))]) for n in index_lookups(x))


def role_array(role: InputRole, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """A random array for one input by its role: indices uniform in ``[0, entries)``, an all-ones mask, N(0, 1) floats."""
    if role.kind == "indices":
        return rng.integers(0, int(role.entries or 1), size=tuple(shape), dtype=np.int64).astype(role.dtype)
    if role.kind == "mask":
        return np.ones(tuple(shape), dtype=np.bool_ if role.dtype == "bool" else role.dtype)
    return rng.standard_normal(tuple(shape)).astype(np.float32)
