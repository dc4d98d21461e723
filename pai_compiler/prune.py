"""Python API: prune an ``nn.Module`` at initialisation and attach the masks the torch way.

    result = pai_compiler.prune(model, torch.randn(2, 3, 32, 32), sparsity=0.95)
    result = pai_compiler.prune(bert, {"input_ids": ids, "attention_mask": mask})  # a dict: keyword inputs
    result.apply(model)          # weight -> weight_orig + weight_mask (torch.nn.utils.prune)
    train(model)                 # pruned weights stay exactly 0 (SGD, momentum, wd, DDP)

The module is lowered by torch.fx, or torch.export where fx fails (``frontend="auto"``; ``"fx"`` or
``"export"`` force one; ``result.graph.meta["frontend"]`` names the one used), the pipeline
(allocation + criterion, as ``paic optimize`` builds it) runs on the IR, and the masks come
back keyed by parameter FQN. ``result.report`` is the ``paic audit --json`` document of the
pruned graph.
"""
from __future__ import annotations

import os
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pai_compiler.api import OptimizeResult, optimize, save_model
from pai_compiler.audit import audit_graph
from pai_compiler.errors import UsageError

__all__ = ["prune", "PruneResult", "default_method"]


def default_method() -> str:
    """``dpai`` when the pass is registered, else ``magnitude``."""
    from pai_compiler.registry import available_passes

    return "dpai" if "dpai" in available_passes() else "magnitude"


@dataclass
class PruneResult:
    """Masks (parameter FQN -> bool tensor), the audit report, and the pruned IR."""

    masks: dict[str, Any]
    report: dict[str, Any]
    pipeline: str
    optimized: Any = field(repr=False)

    @property
    def graph(self) -> Any:
        return self.optimized.graph

    @property
    def density(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / total if total else 1.0

    def apply(self, model: Any) -> Any:
        """Attach the masks to ``model`` with ``torch.nn.utils.prune.custom_from_mask``; returns it."""
        from pai_compiler.backends.torch_backend import attach_masks

        return attach_masks(model, self.masks)

    def save(self, out: str | os.PathLike[str]) -> None:
        """Write ``.pt`` (state_dict, masks, meta) or a masked ``.onnx``."""
        save_model(self.optimized, self.graph.meta.get("torch_spec", "<nn.Module>"), out)


def _report(result: OptimizeResult) -> dict[str, Any]:
    """The audit document of the pruned graph, with the run's warnings."""
    return audit_graph(result.graph, run_warnings=result.warnings)


def prune(
    model: Any,
    example_input: Any,
    sparsity: float | None = 0.95,
    method: str | None = None,
    allocation: str = "erk",
    seed: int = 0,
    device: str = "cpu",
    pipeline: str | None = None,
    *,
    frontend: str = "auto",
    steps: int | None = None,
    exclude: Sequence[str] = (),
    prune_in_proj: bool = True,
    prune_tied: bool = False,
    data: Any = None,
    report: bool = True,
) -> PruneResult:
    """Prune ``model`` (not modified) before training.

    ``example_input`` is a tensor or tuple (positional inputs), a dict (keyword inputs, e.g.
    ``{"input_ids": ids, "attention_mask": mask}``) or a shape; every tensor in the model's output
    (a tensor, tuple, dict or ``ModelOutput``) is a graph output. ``method`` defaults to
    :func:`default_method`; ``pipeline`` (e.g. ``"erk{sparsity=0.9},dpai{steps=100}"``) replaces
    sparsity/method/allocation. ``prune_in_proj=False`` keeps ``nn.MultiheadAttention.in_proj_weight``
    dense (DPaI reference); ``prune_tied=True`` prunes a weight tied to an embedding table (an LM
    head, which then zeroes the same table entries) instead of keeping it dense with a warning.
    """
    from torch import nn

    from pai_compiler.backends.torch_backend import masks_of
    from pai_compiler.frontends.torch.spec import lower_module

    if not isinstance(model, nn.Module):
        raise UsageError(f"prune() needs a torch.nn.Module, got {type(model).__name__}")
    if frontend not in ("auto", "fx", "export"):
        raise UsageError(f"frontend must be 'auto', 'fx' or 'export', got {frontend!r}")
    graph = lower_module(model, example_input, frontend, prune_in_proj=prune_in_proj, prune_tied=prune_tied)
    result = optimize(
        graph, sparsity=None if pipeline else sparsity, method=method or default_method(), allocation=allocation,
        pipeline=pipeline, seed=seed, steps=steps, exclude=exclude, device=device, data=data,
    )
    doc = _report(result) if report else {}
    return PruneResult(masks_of(result), doc, result.pipeline, result)


class _CallableModule(types.ModuleType):
    """``pai_compiler.prune`` is this module once imported; calling it calls :func:`prune`."""

    def __call__(self, *args: Any, **kwargs: Any) -> PruneResult:
        return prune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
