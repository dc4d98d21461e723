"""The traced forward of a sparse-execution module (``forward_form="traced"``): exact, a cache, and a clean fallback.

* The TorchScript trace of the compiled forward equals the plan (and the masked model) on every
  example model, with sparse kernels of every form installed, at the traced batch and another one,
  bit for bit from call to call.
* It is never pickled: ``torch.save`` writes the module without it, ``torch.load`` gives a module
  that rebuilds it on its first call; ``.to()`` and ``install`` drop it; it is keyed on strides.
* A tracer failure or a trace that differs from the plan leaves the plan running, with the reason
  in ``traced().reason`` and the build report's ``forward_note``; the build takes the trace only
  where its (fixed, in these tests) time beats the plan's.
"""
from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from pai_compiler import api
from pai_compiler.backends import sparse_forward, sparse_select, sparse_traced
from pai_compiler.backends.sparse_select import build_sparse_module
from pai_compiler.backends.sparse_timing import relative_error
from pai_compiler.backends.torch_sparse import TRACED, SparseModule
from pai_compiler.interp import Interpreter
from pai_compiler.ir import Graph

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"


def _pruned(name: str, sparsity: float = 0.95) -> tuple[Graph, Graph]:
    """(the masked graph, its compacted copy) of an example model pruned by random-ERK."""
    graph = api.load_model(EXAMPLES / f"{name}.onnx")
    api.optimize(graph, sparsity=sparsity, method="random-erk")
    masked = graph.clone()
    api.compact_graph(graph)
    return masked, graph


def _input(graph: Graph, batch: int, seed: int) -> torch.Tensor:
    return torch.randn([batch, *graph.inputs[0].shape[1:]], generator=torch.Generator().manual_seed(seed))


def _reloaded(module: SparseModule) -> SparseModule:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("name", ["resnet20", "vgg_small", "tiny_vit"])
def test_traced_forward_equals_the_plan_and_the_masked_model(name: str) -> None:
    masked, graph = _pruned(name)
    module, report = build_sparse_module(graph, batch=1, repeats=1, warmup=0, policy="sparse")
    assert report.sparse_layers > 0
    module.forward_form = TRACED
    with torch.no_grad():
        for batch, seed in ((1, 0), (3, 1)):  # the build's batch and another signature (traced on first use)
            x = _input(masked, batch, seed)
            traced = module.traced([x])
            assert traced.forward is not None, traced.reason
            got = module(x)
            assert relative_error(got, module.plan([x]).run([x])[0]) <= sparse_traced.EXACT_TRACE
            assert relative_error(got, Interpreter(masked).run([x]).outputs[0]) <= 1e-5
            assert torch.equal(got, module(x))  # deterministic, bit for bit


def test_trace_is_a_cache_never_pickled_and_dropped_by_changes() -> None:
    masked, graph = _pruned("resnet20", 0.99)
    module, _ = build_sparse_module(graph, batch=1, repeats=1, warmup=0, policy="sparse")
    module.forward_form = TRACED
    x = _input(masked, 1, 2)
    with torch.no_grad():
        ref = module(x)
        assert len(module._traces) == 1
        reloaded = _reloaded(module)  # a ScriptModule in the state would make torch.save fail
        assert reloaded.forward_form == TRACED and not reloaded._traces
        assert torch.equal(reloaded(x), ref) and len(reloaded._traces) == 1
        nhwc = x.contiguous(memory_format=torch.channels_last)  # same signature, other strides: its own trace
        assert relative_error(reloaded(nhwc), ref) <= 1e-6 and len(reloaded._traces) == 2
        reloaded.to("cpu")
        assert not reloaded._traces
        name = next(iter(reloaded.kernel_of))
        reloaded.install(name, None)  # back to its dense layer: the old trace must not run the sparse kernel
        assert not reloaded._traces
        assert relative_error(reloaded(x), ref) <= 1e-5
        assert all(step.kernel != module.kernel_of[name] for step in reloaded.plan([x]).steps)


def test_a_module_pickled_before_traces_runs_its_plan() -> None:
    _, graph = _pruned("vgg_small")
    module, _ = build_sparse_module(graph, batch=1, repeats=1, warmup=0, policy="dense")
    state = module.__getstate__()
    del state["_traces"], state["forward_form"]
    old = SparseModule.__new__(SparseModule)
    old.__setstate__(state)
    x = _input(graph, 1, 3)
    with torch.no_grad():
        assert old.forward_form == "plan" and torch.equal(old(x), module.plan([x]).run([x])[0])


def test_a_failing_trace_falls_back_to_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("tracer says no")

    monkeypatch.setattr(sparse_traced.torch.jit, "trace", broken)
    _, graph = _pruned("vgg_small")
    module, report = build_sparse_module(graph, batch=1, repeats=1, warmup=0, policy="sparse")
    assert report.forward == "plan" and "not traceable: RuntimeError: tracer says no" in report.forward_note and not report.forward_ms
    module.forward_form = TRACED  # even when asked for, a module without a trace runs its plan
    x = _input(graph, 1, 4)
    with torch.no_grad():
        assert torch.equal(module(x), module.plan([x]).run([x])[0])


def test_a_trace_that_differs_from_the_plan_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trace bakes in what it saw: one whose outputs differ (here: every output scaled) must not be used."""
    real_freeze = torch.jit.freeze

    def wrong(module: Any) -> Any:
        frozen = real_freeze(module)
        return lambda *inputs: tuple(t * 1.001 for t in frozen(*inputs))

    monkeypatch.setattr(sparse_traced.torch.jit, "freeze", wrong)
    _, graph = _pruned("vgg_small")
    module, _ = build_sparse_module(graph, batch=1, repeats=1, warmup=0, policy="sparse")
    x = _input(graph, 1, 5)
    with torch.no_grad():
        traced = module.traced([x])
    assert traced.forward is None and "differs from the plan's" in traced.reason


def _fixed_forward_times(times: Mapping[str, float]) -> Any:
    def fake(candidates: Mapping[str, Any], **_: Any) -> dict[str, float]:
        for run in candidates.values():
            run()
        return {name: times.get(name, 1.0) for name in candidates}
    return fake


@pytest.mark.parametrize("traced_ms,chosen", [(0.5, TRACED), (2.0, "plan"), (0.97, "plan")])  # 0.97: within the 0.95 margin
def test_build_takes_the_trace_only_where_it_is_faster(monkeypatch: pytest.MonkeyPatch, traced_ms: float, chosen: str) -> None:
    for module in (sparse_select, sparse_forward):
        monkeypatch.setattr(module, "time_alternating", _fixed_forward_times({"plan": 1.0, TRACED: traced_ms}))
    masked, graph = _pruned("vgg_small")
    module, report = build_sparse_module(graph, batch=1, repeats=1, warmup=0, policy="sparse")
    doc = report.to_dict()
    assert doc["forward"] == chosen == module.forward_form and doc["forward_ms"] == {"plan": 1.0, TRACED: traced_ms}
    assert bool(doc["forward_note"]) == (chosen == "plan")
    x = _input(masked, 2, 6)
    with torch.no_grad():
        assert relative_error(_reloaded(module)(x), Interpreter(masked).run([x]).outputs[0]) <= 1e-5


def test_a_faster_traced_dense_model_puts_every_layer_back_to_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sparse layers win one by one and as a plan, but traced, the dense model is faster: it is what the module runs."""
    times = {"dense": 2.0, "plain": 3.0, "chosen": 1.0, "other": 1.5, "plan": 1.0, TRACED: 0.8, "traced_dense": 0.5}
    for module in (sparse_select, sparse_forward):
        monkeypatch.setattr(module, "time_alternating", _fixed_forward_times(times))
    masked, graph = _pruned("vgg_small")
    module, report = build_sparse_module(graph, batch=1, repeats=1, warmup=0)
    assert report.forward == TRACED == module.forward_form and report.forward_ms == {"plan": 1.0, TRACED: 0.8, "traced_dense": 0.5}
    assert not module.kernel_of and report.sparse_layers == 0 and "traced, the dense model ran 0.500 ms" in report.fallback
    assert all(row.choice == "dense" for row in report.layers)
    x = _input(masked, 1, 7)
    with torch.no_grad():
        assert relative_error(_reloaded(module)(x), Interpreter(masked).run([x]).outputs[0]) <= 1e-5


def test_the_build_traces_only_the_timed_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """A built module takes its trace at the signature it was timed at; another batch runs the plan
    (no trace on the fly), equal to the masked model, and the timed shape re-traces once after load."""
    for module in (sparse_select, sparse_forward):
        monkeypatch.setattr(module, "time_alternating", _fixed_forward_times({"plan": 1.0, TRACED: 0.5}))
    masked, graph = _pruned("vgg_small")
    module, _ = build_sparse_module(graph, batch=1, repeats=1, warmup=0, policy="sparse")
    reloaded = _reloaded(module)
    assert reloaded.forward_form == TRACED and reloaded.trace_signatures is not None and len(reloaded.trace_signatures) == 1
    with torch.no_grad():
        for batch, traces in ((3, 0), (1, 1), (2, 1)):
            x = _input(masked, batch, batch)
            assert relative_error(reloaded(x), Interpreter(masked).run([x]).outputs[0]) <= 1e-5
            assert len(reloaded._traces) == traces, batch
