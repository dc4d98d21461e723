"""AnalysisManager caching/invalidation and PassManager verification, history and contracts."""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from pai_compiler.errors import PassError
from pai_compiler.ir import Graph, OpKind
from pai_compiler.pass_infra import (
    AnalysisManager,
    AnalysisPass,
    PassManager,
    PassResult,
    PrintIRInstrument,
    TimingInstrument,
    TransformPass,
)
from pai_compiler.passes.analysis.sparsity import SparsityPass
from pai_compiler.passes.criteria.magnitude import MagnitudePass
from tests.test_ir import small_graph


@dataclass(frozen=True)
class CountNodes(AnalysisPass[int]):
    name: ClassVar[str] = "count-nodes"

    def run(self, graph: Graph, am: AnalysisManager) -> int:
        return len(graph)


@dataclass(frozen=True)
class Noop(TransformPass):
    name: ClassVar[str] = "noop"
    lie: bool = False

    def run(self, graph: Graph, am: AnalysisManager) -> PassResult:
        if self.lie:  # claims no change but mutates
            graph.set_attr(graph.node("relu1"), "x", 1)
        return PassResult(modified=False)


@dataclass(frozen=True)
class AddNeg(TransformPass):
    name: ClassVar[str] = "add-neg"
    preserve: bool = False

    def run(self, graph: Graph, am: AnalysisManager) -> PassResult:
        y = graph.value("fc1")
        graph.add_node(OpKind.POINTWISE, graph.fresh_name("neg"), [y], [(graph.fresh_name("n"), y.shape, "float32")], attrs={"op": "neg"})
        return PassResult(modified=True, preserved=frozenset({"count-nodes"}) if self.preserve else frozenset())


@dataclass(frozen=True)
class Breaker(TransformPass):
    name: ClassVar[str] = "breaker"

    def run(self, graph: Graph, am: AnalysisManager) -> PassResult:
        graph.value("fc1").uses.clear()
        return PassResult(modified=True)


def test_analysis_cache_and_invalidation() -> None:
    g = small_graph()
    am = AnalysisManager(g)
    assert am.get(CountNodes()) == 4 and am.get(CountNodes()) == 4
    assert am.computed == 1
    PassManager([AddNeg()]).run(g, am)
    assert am.get(CountNodes()) == 5 and am.computed == 2
    # a pass that claims to preserve the analysis keeps the (now stale) cached value
    PassManager([AddNeg(preserve=True)]).run(g, am)
    assert am.get(CountNodes()) == 5 and am.computed == 2
    # a mutation outside the pass manager changes the version: the cache is stale
    g.set_attr(g.node("relu1"), "k", 1)
    assert am.get(CountNodes()) == 6 and am.computed == 3


def test_verify_after_each_transform_and_history() -> None:
    g = small_graph()
    with pytest.raises(PassError) as info:
        PassManager([MagnitudePass(sparsity=0.5), Breaker()]).run(g)
    msg = str(info.value)
    assert "pass 'breaker'" in msg and "after [magnitude{sparsity=0.5}]" in msg and "use-list" in msg
    assert info.value.history == ("magnitude{sparsity=0.5}",)


def test_contract_modified_false_must_not_change_graph() -> None:
    with pytest.raises(PassError, match="modified=False"):
        PassManager([Noop(lie=True)]).run(small_graph())
    PassManager([Noop()]).run(small_graph())


def test_instruments_time_and_print_ir() -> None:
    g = small_graph()
    timer, stream = TimingInstrument(), io.StringIO()
    records = PassManager([MagnitudePass(sparsity=0.5), SparsityPass()], instruments=[timer, PrintIRInstrument(stream)]).run(g)
    assert [name for name, _ in timer.timings] == ["magnitude{sparsity=0.5}", "sparsity"]
    assert stream.getvalue().count("// ----- IR after") == 2 and "kept 6/12" in stream.getvalue()
    assert records[1].result.kept == 6 and records[1].kind == "analysis"


def test_magnitude_keeps_largest() -> None:
    g = small_graph()
    PassManager([MagnitudePass(sparsity=0.75)]).run(g)
    mask = g.prunable_params()[0].mask
    assert np.array_equal(np.flatnonzero(mask), [9, 10, 11])
