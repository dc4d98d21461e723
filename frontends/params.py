"""Weights read in more than one layout (``W`` and ``Wᵀ``, e.g. tied input/output projections).

A Param's ``out_axis``/``in_axis`` say how its node reads the stored tensor, so one Param cannot
serve two layouts. The first use keeps the weight's Param, now dense (a mask cannot follow both
layouts), and every other layout gets a dense *twin*: a Param over the same array with its own
axes and the same ``origin``, so each node computes what the model computes. Passes that edit
weights (dead-node elimination) treat Params sharing an origin as one shared weight.
"""
from __future__ import annotations

from pai_compiler.ir import Param

__all__ = ["layout_twin"]


def layout_twin(first: Param, out_axis: int, in_axis: int | None, twins: dict[str, Param], warnings: list[str]) -> Param:
    """The Param for reading ``first``'s tensor with ``(out_axis, in_axis)``; ``first`` is kept dense."""
    if (first.out_axis, first.in_axis) == (out_axis, in_axis):
        return first
    if first.prunable:
        warnings.append(f"weight {first.origin!r} is used with two layouts; it is kept dense")
        first.prunable = False
    key = f"{first.origin}@{out_axis},{in_axis}"
    if key not in twins:
        twins[key] = Param(f"{first.origin}.layout{len(twins) + 1}", first.data, prunable=False, out_axis=out_axis,
                           in_axis=in_axis, origin=first.origin)
    return twins[key]
