"""Contract suite: every registered pass on every fixture model completes or refuses in one line.

Fixtures are the three example models and the builder-made residual, concat and attention
graphs. A pass either finishes (then the graph verifies, and a criterion's masks keep exactly
the allocated count per layer: the count ``random{scope=layer}`` keeps under the same
allocation, or ``n - floor(s*n)`` under ``uniform``) or raises a ``PaicError`` whose message is
one line, and only where ``REFUSES`` says it should. Options are kept tiny (``dpai{steps=3}``, ``synflow{iterations=2}``) so the file is fast.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from fixture_graphs import BUILT_GRAPHS
from pai_compiler.errors import PaicError
from pai_compiler.frontends.onnx import load_onnx_model
from pai_compiler.ir import Graph
from pai_compiler.lab.data import load_batch_for
from pai_compiler.pass_infra import AnalysisManager, AnalysisPass, PassManager, RunContext
from pai_compiler.passes.allocation.base import keep_count
from pai_compiler.pipeline import parse_pipeline
from pai_compiler.registry import available_passes, get_pass_class

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
ALLOCATION = "erk{sparsity=0.8}"
#: criteria (masks from an allocation), with tiny options; run after ALLOCATION
CRITERIA = {
    "random": "random{scope=layer,seed=0}",
    "magnitude": "magnitude{scope=layer}",
    "synflow": "synflow{scope=layer,iterations=2}",
    "snip": "snip{scope=layer}",
    "grasp": "grasp{scope=layer}",
    "autosparse": "autosparse{scope=layer}",
    "dpai": "dpai{steps=3}",
    "npb": "npb{time_limit=2}",
}
#: passes that stand alone: allocations, self-allocating criteria, analyses, transforms
STANDALONE = {
    "erk": "erk{sparsity=0.8}",
    "uniform": "uniform{sparsity=0.8}",
    "random-erk": "random-erk{sparsity=0.8,seed=0}",
    "sparsity": "sparsity",
    "node-path": "node-path",
    "flops": "flops{effective=true}",
    "dead-node-elim": "dead-node-elim",  # after random masks (below), so there is something to remove
}
DATA_DRIVEN = {"snip", "grasp", "autosparse"}
#: (pass, fixture) -> why it refuses. Today every pass handles every fixture: a refusal elsewhere
#: is a regression even when its message is one clean line.
REFUSES: dict[tuple[str, str], str] = {}


def _example(name: str) -> Callable[[], Graph]:
    return lambda: load_onnx_model(EXAMPLES / f"{name}.onnx")


FIXTURES: dict[str, Callable[[], Graph]] = {
    **{name: _example(name) for name in ("resnet20", "vgg_small", "tiny_vit")},
    **BUILT_GRAPHS,
}


@cache
def _pristine(fixture: str) -> Graph:
    return FIXTURES[fixture]()


def _graph(fixture: str) -> Graph:
    return _pristine(fixture).clone()


def _context(graph: Graph, data_driven: bool) -> RunContext:
    data = load_batch_for(graph, "random", samples_per_class=1, seed=0) if data_driven else None
    return RunContext(seed=0, data=data)


def _run(graph: Graph, pipeline: str, data_driven: bool = False) -> PaicError | None:
    """Run ``pipeline``; return the PaicError it refused with (one line), or None after verifying."""
    try:
        PassManager(parse_pipeline(pipeline)).run(graph, AnalysisManager(graph, _context(graph, data_driven)))
    except PaicError as exc:
        assert "\n" not in str(exc).strip(), f"{pipeline}: a refusal is one line, got {exc}"
        return exc
    graph.verify()
    return None


@cache
def _allocated_kept(fixture: str) -> dict[str, int]:
    """Per-layer kept counts under ALLOCATION, as the plain random criterion keeps them."""
    graph = _graph(fixture)
    assert _run(graph, f"{ALLOCATION},{CRITERIA['random']}") is None
    return {p.name: p.kept() for p in graph.prunable_params()}


def test_every_registered_pass_is_in_the_suite() -> None:
    assert set(available_passes()) == set(CRITERIA) | set(STANDALONE)


#: (criterion, fixture) -> reason, for a reported bug (strict xfail: fixing it fails the test); none today.
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def _criterion_cases() -> list[object]:
    cases: list[object] = []
    for criterion in sorted(CRITERIA):
        for fixture in sorted(FIXTURES):
            bug = KNOWN_BUGS.get((criterion, fixture))
            marks = [pytest.mark.xfail(reason=bug, strict=True)] if bug else []
            cases.append(pytest.param(criterion, fixture, marks=marks, id=f"{criterion}-{fixture}"))
    return cases


@pytest.mark.parametrize(("criterion", "fixture"), _criterion_cases())
def test_criterion_keeps_the_allocated_counts(criterion: str, fixture: str) -> None:
    graph = _graph(fixture)
    refusal = _run(graph, f"{ALLOCATION},{CRITERIA[criterion]}", data_driven=criterion in DATA_DRIVEN)
    assert (refusal is not None) == ((criterion, fixture) in REFUSES), refusal
    if refusal is not None:
        return
    kept = {p.name: p.kept() for p in graph.prunable_params()}
    allocated = _allocated_kept(fixture)
    if criterion == "npb":
        # documented (npb/finetune.py, after the reference): budgets of chunked convs are ceil(rho * block)
        # per block of output channels, and the fine-tune carries a layer's ineffective count to the next
        # layer and re-spends it on whole kernels, "so the last may overshoot it" by less than one kernel
        params = graph.prunable_params()
        slack = sum(p.shape[p.out_axis] + (int(np.prod(p.shape[2:])) if len(p.shape) > 2 else 1) for p in params)
        assert 0 <= sum(kept.values()) - sum(allocated.values()) <= slack, (kept, allocated)
        assert all(0 < kept[p.name] <= p.numel for p in params), kept
    else:
        assert kept == allocated
    assert all(p.mask is not None and p.mask.dtype == np.bool_ for p in graph.prunable_params())


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_uniform_allocation_keeps_n_minus_floor_sn(fixture: str) -> None:
    graph = _graph(fixture)
    assert _run(graph, "uniform{sparsity=0.8},random{scope=layer,seed=0}") is None
    assert {p.name: p.kept() for p in graph.prunable_params()} == {p.name: keep_count(p.numel, 0.8) for p in graph.prunable_params()}


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
@pytest.mark.parametrize("name", sorted(STANDALONE))
def test_standalone_pass_completes_or_refuses(fixture: str, name: str) -> None:
    graph = _graph(fixture)
    before = {p.name: p.kept() for p in graph.prunable_params()}
    prefix = "uniform{sparsity=0.9},random{scope=layer,seed=0}," if name == "dead-node-elim" else ""
    refusal = _run(graph, prefix + STANDALONE[name])
    assert (refusal is not None) == ((name, fixture) in REFUSES), refusal
    if refusal is not None:
        return
    if issubclass(get_pass_class(name), AnalysisPass):
        assert {p.name: p.kept() for p in graph.prunable_params()} == before  # analyses do not touch the graph
    if name == "random-erk":
        assert 0 < sum(p.kept() for p in graph.prunable_params()) < sum(before.values())


def test_a_refusal_is_one_line() -> None:
    """The refusal path is real: a criterion with no allocation and no sparsity says so in one line."""
    refusal = _run(_graph("residual"), "dpai{steps=3}")
    assert refusal is not None and "allocation" in str(refusal)
