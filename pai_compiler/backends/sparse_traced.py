"""TorchScript form of a SparseModule's compiled forward: the plan traced per input signature, frozen, checked.

At batch 1 a small model's call is mostly fixed cost per op rather than arithmetic: the plan's
Python loop, each kernel's Python body and torch's argument parsing, a few µs per op on ~50-100
ops. ``trace_plan(plan, inputs)`` records the ops the plan runs on ``inputs`` (``torch.jit.trace``:
the module's tensors and the kernels' caches become constants), freezes the result
(``torch.jit.freeze``) and returns a forward the TorchScript interpreter runs without Python.
A trace is exact only for what it saw (control flow, shapes and strides of ``inputs``), so it is
keyed on every input's shape, dtype, device *and strides* (:func:`trace_key`), and it is kept only
when its outputs equal the plan's (max relative error ``<= EXACT_TRACE``) on ``inputs`` and on a
second input of the same signature (float inputs redrawn from a seeded N(0, 1); integer inputs,
indices or masks, kept). Anything else (a kernel the tracer cannot record, a mismatch) gives a
:class:`TracedForward` with no ``forward`` and the reason, and the module runs its plan.
A ScriptModule is not pickled with the module: it is a cache, rebuilt on the first call of each
signature after ``torch.load`` (see :class:`~pai_compiler.backends.torch_sparse.SparseModule`).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch  # the traced forward is a TorchScript module (imported with torch_sparse)

from pai_compiler.backends.sparse_plan import ForwardPlan, signature_of
from pai_compiler.backends.sparse_timing import relative_error

__all__ = ["TracedForward", "TraceKey", "trace_key", "trace_plan", "EXACT_TRACE", "TRACE_WARMUP"]

#: the largest relative error a traced forward may have against the plan it recorded
EXACT_TRACE = 1e-6
#: calls of a fresh traced forward before it is checked and timed (TorchScript's executor
#: profiles and specialises the graph on its first calls)
TRACE_WARMUP = 2
#: the seed of the second input a trace is checked on
CHECK_SEED = 20261207

TraceKey = tuple[Any, ...]


def trace_key(inputs: Sequence[torch.Tensor]) -> TraceKey:
    """What a traced forward is specialised on: the plan's signature plus every input's strides."""
    return (signature_of(inputs), tuple(tuple(t.stride()) for t in inputs))


@dataclass(frozen=True)
class TracedForward:
    """A checked TorchScript forward for one input signature (``forward`` None: why not, in ``reason``)."""

    forward: Callable[..., Any] | None
    reason: str = ""

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.forward is None:
            raise RuntimeError(f"no traced forward: {self.reason}")
        return list(self.forward(*inputs))


class _PlanCall(torch.nn.Module):
    """The plan as a module with a tuple output (what ``torch.jit.trace`` records). ``owner`` (the module whose
    tensors and kernels the plan reads) is a submodule so that its tensors are attributes of the trace, not
    constants: the tracer has no constants of sparse layouts, and freezing inlines the strided ones anyway."""

    def __init__(self, plan: ForwardPlan, owner: torch.nn.Module) -> None:
        super().__init__()
        self.plan = plan
        self.owner = owner

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.plan.run(list(inputs)))


def _second_input(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Same signature and strides; float inputs redrawn (seeded), the rest (indices, masks) kept."""
    generator = torch.Generator().manual_seed(CHECK_SEED)
    redrawn: list[torch.Tensor] = []
    for t in inputs:
        if t.is_floating_point():
            fresh = torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
            redrawn.append(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(fresh))
        else:
            redrawn.append(t)
    return redrawn


def _mismatch(traced: Callable[..., Any], plan: ForwardPlan, inputs: Sequence[torch.Tensor]) -> str:
    """"" when ``traced`` equals ``plan`` on ``inputs`` (after its warm-up calls), else what differs."""
    for _ in range(TRACE_WARMUP):
        got = list(traced(*inputs))
    ref = plan.run(inputs)
    if len(got) != len(ref):
        return f"the trace has {len(got)} outputs, the plan {len(ref)}"
    for index, (a, b) in enumerate(zip(got, ref)):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"output {index}: {tuple(a.shape)} {a.dtype} traced, {tuple(b.shape)} {b.dtype} planned"
        error = relative_error(a, b)
        if error > EXACT_TRACE:
            return f"output {index} differs from the plan's (max relative error {error:.1e})"
    return ""


def trace_plan(plan: ForwardPlan, inputs: Sequence[torch.Tensor], owner: torch.nn.Module) -> TracedForward:
    """``plan`` (reading ``owner``'s tensors and kernels) recorded on ``inputs`` and frozen, checked against
    the plan on ``inputs`` and on a second input."""
    inputs = list(inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic: the trace is keyed on the shapes
        try:
            plan.run(inputs)  # fills the kernels' per-shape caches (index tables, packed weights): constants, not traced work
            traced = torch.jit.freeze(torch.jit.trace(_PlanCall(plan, owner).eval(), tuple(inputs), check_trace=False))
        except Exception as exc:  # noqa: BLE001 (any tracer or freezer failure means: run the plan)
            return TracedForward(None, f"not traceable: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}")
        try:
            problem = _mismatch(traced, plan, inputs) or _mismatch(traced, plan, _second_input(inputs))
        except Exception as exc:  # noqa: BLE001 (a trace that cannot rerun is no forward)
            problem = f"the trace fails to rerun: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
    return TracedForward(None, problem) if problem else TracedForward(traced)
