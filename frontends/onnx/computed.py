"""Names for conv/linear weights computed at compile time from stored tensors.

A layer whose weight operand is a float tensor the reader folded from constants (torch prune's
``Mul(Cast(weight_mask), weight_orig)``, weight norm's ``g * v / ||v||``, a Transpose/Reshape of
such a product, Identity chains) owns it like a stored weight: one prunable Param per computed
ONNX value (its ``origin``; ``weight_sources[origin] = "computed"``), and
``graph.meta["computed_uses"][origin]`` lists the (node index, input index) pairs where ONNX
nodes read it, so a backend writes the masked weight as a new initializer and points those
inputs at it (``pai_compiler.backends.onnx_masked.rewire_computed``).

The Param is named after the stored tensor it is made from: among the stored tensors the
computation reads (breadth first from the value), the first float one of the weight's size that
is not a 0/1 mask (``0.weight_orig``, not ``0.weight_mask``; weight norm's ``v``, not ``g``);
failing that the first float one of the weight's size (a 0/1 tensor), failing that the computed value's own name. A
stored tensor that nodes outside the computation read may get a Param of its own under its
name, so the computed weight is then called ``<tensor>.computed``.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from pai_compiler.frontends.onnx.static import is_float_array

__all__ = ["computed_weight_name"]


def computed_weight_name(value: str, size: int, producers: Mapping[str, Any], stored: Mapping[str, np.ndarray],
                         readers: Mapping[str, int]) -> str:
    """The name of the Param for the weight computed as ONNX value ``value`` (``size`` elements)."""
    sources, inner_reads = _stored_sources(value, producers, stored)
    same_size = [name for name in sources if stored[name].size == size and is_float_array(stored[name])]
    weights = [name for name in same_size if not _is_binary(stored[name])]
    chosen = (weights or same_size or [None])[0]
    if chosen is None:
        return value
    return chosen if readers.get(chosen, 0) <= inner_reads[chosen] else f"{chosen}.computed"


def _stored_sources(value: str, producers: Mapping[str, Any], stored: Mapping[str, np.ndarray]) -> tuple[list[str], Counter[str]]:
    """The stored tensors (initializers, Constant outputs) ``value`` is computed from, breadth
    first, and how often the computation's nodes read each name."""
    found: list[str] = []
    reads: Counter[str] = Counter()
    seen = {value}
    visited: set[int] = set()  # a node with several outputs is read once
    frontier = [value]
    while frontier:
        following: list[str] = []
        for node in (producers.get(name) for name in frontier):
            if node is None or id(node) in visited:
                continue
            visited.add(id(node))
            for source in [i for i in node.input if i]:
                reads[source] += 1
                if source in seen:
                    continue
                seen.add(source)
                (found if source in stored else following).append(source)
        frontier = following
    return found, reads


def _is_binary(array: np.ndarray) -> bool:
    """Every entry 0 or 1: a pruning mask rather than a weight."""
    return bool(np.all((array == 0) | (array == 1)))
