"""How a SparseModule runs its calls: its compiled plan, the plan's TorchScript trace, or the traced all-dense model.

``choose_forward`` (the last step of :func:`~pai_compiler.backends.sparse_select.build_sparse_module`)
traces the module's plan (:mod:`~pai_compiler.backends.sparse_traced`), checks the trace against the
masked model's outputs (max relative error ``<= exact``) and times the plan, the trace and, under
``policy="auto"`` with sparse layers, the trace of the all-dense plan (alternating medians, as every
choice of the build: under the tracer a packed oneDNN conv runs as ``F.conv2d``, which can beat the
sparse kernels on tiny layers). A traced form is kept only when it beats the plan by ``margin``;
the traced dense model puts every layer back to dense (:func:`back_to_dense`). The trace runs for
the input signature timed here only (``SparseModule.trace_signatures``): a call of another shape
runs the plan rather than tracing on the fly. The report's ``forward``, ``forward_ms`` and
``forward_note`` say which ran and why.
"""
from __future__ import annotations

from dataclasses import replace

import torch  # the candidates are torch calls (imported with sparse_select)

from pai_compiler.backends.sparse_plan import signature_of
from pai_compiler.backends.sparse_timing import SparseExecReport, relative_error, time_alternating
from pai_compiler.backends.sparse_traced import TracedForward, trace_plan
from pai_compiler.backends.torch_sparse import TRACED, SparseModule

__all__ = ["choose_forward", "back_to_dense", "TRACED_DENSE"]

#: the forward candidate that is the trace of the all-dense plan
TRACED_DENSE = "traced_dense"


def back_to_dense(module: SparseModule, report: SparseExecReport, why: str) -> None:
    """Every layer back on its dense kernel, the report's rows and ``fallback`` saying ``why``."""
    for name in list(module.kernel_of):
        module.install(name, None)
    report.fallback = why
    report.layers = [replace(row, choice="dense", reason=row.reason + "; model-level fallback") for row in report.layers]


def _checked_trace(module: SparseModule, inputs: list[torch.Tensor], reference: list[torch.Tensor], *, sparse: bool,
                   exact: float) -> tuple[TracedForward | None, str]:
    """The trace of the module's plan (``sparse=False``: every layer dense) if it equals the masked model, else (None, why)."""
    traced = module.traced(inputs) if sparse else trace_plan(module.plan(inputs, sparse=False), inputs, module)
    if traced.forward is None:
        return None, traced.reason
    error = max((relative_error(got, ref) for got, ref in zip(traced.run(inputs), reference) if ref.is_floating_point()), default=0.0)
    if error > exact:
        return None, f"the trace differs from the masked model (max relative error {error:.1e})"
    return traced, ""


def choose_forward(module: SparseModule, inputs: list[torch.Tensor], report: SparseExecReport, *, reference: list[torch.Tensor],
                   exact: float, policy: str = "auto", margin: float = 0.95) -> None:
    """Run the module's calls through the plan's TorchScript trace where it equals the masked model (max relative
    error ``<= exact``) and beats the plan by ``margin`` (medians, alternating). Under ``policy="auto"`` with sparse
    layers, the traced *dense* model is a candidate too (tracing can cut the dense layers' cost more than the
    sparse ones'): if it wins, every layer goes back to dense. The report says which and why."""
    traced, why = _checked_trace(module, inputs, reference, sparse=True, exact=exact)
    if traced is None:
        report.forward_note = why
        return
    plan = module.plan(inputs)
    candidates = {"plan": lambda: plan.run(inputs), TRACED: lambda: traced.run(inputs)}
    dense = _checked_trace(module, inputs, reference, sparse=False, exact=exact)[0] if policy == "auto" and module.kernel_of else None
    if dense is not None:
        candidates[TRACED_DENSE] = lambda: dense.run(inputs)
    times = time_alternating(candidates, repeats=report.repeats, warmup=report.warmup, device=report.device)
    report.forward_ms = {name: round(ms, 4) for name, ms in times.items()}
    best = min((name for name in times if name != "plan"), key=times.__getitem__)
    if times[best] >= margin * times["plan"]:
        report.forward_note = f"the trace ran {times[best]:.3f} ms against {times['plan']:.3f} ms for the plan"
        return
    module.forward_form = report.forward = TRACED
    module.trace_signatures = {signature_of(inputs)}  # the shape timed here; other shapes run the plan (no trace on the fly)
    if best == TRACED_DENSE:
        back_to_dense(module, report, f"traced, the dense model ran {times[TRACED_DENSE]:.3f} ms against {times[TRACED]:.3f} ms "
                                       "with the sparse choice: every layer dense")
        report.model_chosen_ms = report.model_dense_ms
