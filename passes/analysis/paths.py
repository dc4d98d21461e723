"""Path counts through binary masks, both conventions: log P = log Σ_out ones-forward(M).

One forward of all-ones inputs (one sample, :func:`sample_bindings`) through the interpreter's
``paths`` semantics: conv/linear with the mask as weight and no bias, norms/activations as
identity, products by the gate rule (see :mod:`pai_compiler.interp`).

* ``exact`` — the natural log of the exact number of input-element -> output-element paths:
  pooling as a **sum**, float64 by default, every value kept as ``t · exp(s)`` with ``t``
  renormalised to max 1 (no overflow), so ``log P = logsumexp_o(log Σ t_o + s_o)``; ``-inf``
  when no path survives.
* ``ref`` — the DPaI reference's R_P (algorithms.md §1.5): pooling as the model's own
  mean/max, float32 by default, each weighted layer's input divided by its max m_l, so
  ``log P̃ = log Σ_out f(1) + Σ_l log m_l`` (exact on chains, skip-weighted on residual nets).

Masks come from the graph's Params, or from ``weights`` (by param name, read lazily): leaves
that require grad make ``log P`` differentiable, ``d log P / d M`` (:func:`path_gradients`),
as DPaI's objective and NPB's effectiveness test need.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pai_compiler.errors import PaicError
from pai_compiler.ir import Graph, Node

if TYPE_CHECKING:
    import torch

    from pai_compiler.interp import InterpResult

__all__ = ["Convention", "PathCount", "count_paths", "log_path_count", "ones_inputs", "path_gradients"]

Convention = Literal["ref", "exact"]


@dataclass(frozen=True)
class PathCount:
    """``log_paths`` (0-d, differentiable through grad-requiring weights) and the run behind it."""

    log_paths: torch.Tensor
    run: InterpResult


def ones_inputs(graph: Graph, bind: Mapping[str, int], dtype: torch.dtype, device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """All-ones ``dtype`` tensors of the graph's input shapes at ``bind``: one path starts at each element.

    Path counting and SynFlow feed these; an integer input that only indexes embedding lookups
    gets float ones too (a lookup is a path source, or outputs ones, whatever its indices).
    """
    import torch  # heavy optional dependency: only path counting needs it

    from pai_compiler.interp import bound_dims  # imports torch

    out = []
    for v in graph.inputs:
        if v.shape is None:
            raise PaicError(f"all-ones input: input {v.name!r} has an unknown shape")
        dims = bound_dims(v.shape, bind)
        if 0 in dims:
            raise PaicError(f"all-ones input: input {v.name!r} has a dimension of size 0 (shape {list(dims)})")
        out.append(torch.ones(dims, dtype=dtype, device=device))
    return out


def count_paths(
    graph: Graph,
    convention: Convention,
    bind: Mapping[str, int],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    weights: Mapping[str, torch.Tensor] | None = None,
    keep_values: bool = True,
    on_node: Callable[[Node, list[torch.Tensor]], None] | None = None,
    distinct_rows: bool = False,
) -> PathCount:
    """log P of ``graph`` in ``convention`` (dtype: float32 for ``ref``, float64 for ``exact``, unless given).

    ``keep_values=False`` frees every value after its last use (the run keeps only outputs);
    ``on_node(node, outputs)`` sees each node as it is evaluated. Gradients flow when the
    caller enables them and ``weights`` holds leaves that require grad. ``distinct_rows``: linear
    layers multiply each distinct input row once (the interpreter's option; equal tokens of an
    all-ones forward make a transformer's GEMMs ~100× smaller; gradients stay exact).
    """
    import torch  # heavy optional dependency: only path counting needs it

    from pai_compiler.interp import Interpreter  # imports torch

    ref = convention == "ref"
    dtype = dtype or (torch.float32 if ref else torch.float64)
    it = Interpreter(graph, mode="paths", dtype=dtype, device=device, weights=weights,
                     pool="model" if ref else "sum", scaling="dpai" if ref else "exact", bind=bind,
                     distinct_rows=distinct_rows)
    run = it.run(ones_inputs(graph, bind, dtype, device), keep_values=keep_values, on_node=on_node)
    return PathCount(log_path_count(run, convention), run)


def log_path_count(run: InterpResult, convention: Convention) -> torch.Tensor:
    """log P from a ``paths``-mode run: ``log Σ out + log_scale`` (``ref``) or ``logsumexp(log Σ out_o + s_o)`` (``exact``)."""
    import torch  # heavy optional dependency: only path counting needs it

    if convention == "ref":
        return torch.log(sum(o.sum() for o in run.outputs)) + run.log_scale  # type: ignore[arg-type]
    dtype, device = run.log_scale.dtype, run.log_scale.device
    terms = [torch.log(o.sum()) + torch.as_tensor(s, dtype=dtype, device=device) for o, s in zip(run.outputs, run.output_log_scales)]
    return torch.logsumexp(torch.stack(terms), 0)


def path_gradients(log_paths: torch.Tensor, leaves: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """``d log P / d leaf`` for each leaf; None where log P does not depend on it (no path reads it)."""
    import torch  # heavy optional dependency: only path counting needs it

    if not log_paths.requires_grad:
        return [None] * len(leaves)
    return list(torch.autograd.grad(log_paths, list(leaves), allow_unused=True))
