"""AnalysisManager caching/invalidation; PassManager verification, history, contracts, Sequential and Fixpoint."""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from pai_compiler.errors import FixpointError, PassError, PostconditionError, PreconditionError, UsageError
from pai_compiler.ir import Graph, OpKind
from pai_compiler.pass_infra import (
    AnalysisManager,
    AnalysisPass,
    Fixpoint,
    PassManager,
    PassResult,
    PrintIRInstrument,
    Sequential,
    TimingInstrument,
    TransformPass,
    iterate_to_fixpoint,
)
from pai_compiler.passes.analysis.sparsity import SparsityPass
from pai_compiler.passes.criteria.dpai.criterion import DpaiPass
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
        return PassResult(modified=True, preserved=frozenset({CountNodes}) if self.preserve else frozenset())


@dataclass(frozen=True)
class Breaker(TransformPass):
    name: ClassVar[str] = "breaker"

    def run(self, graph: Graph, am: AnalysisManager) -> PassResult:
        graph.value("fc1").uses.clear()
        return PassResult(modified=True)


@dataclass(frozen=True)
class CountedNodes(CountNodes):
    name: ClassVar[str] = "counted-nodes"


@dataclass(frozen=True)
class NegUntil(TransformPass):
    """Adds a neg node while the graph has fewer than ``nodes`` nodes (converges if it can)."""

    name: ClassVar[str] = "neg-until"
    nodes: int = 6

    def run(self, graph: Graph, am: AnalysisManager) -> PassResult:
        if len(graph) >= self.nodes:
            return PassResult(modified=False)
        return AddNeg().run(graph, am)


@dataclass(frozen=True)
class Contract(TransformPass):
    name: ClassVar[str] = "contract"
    fail_requires: bool = False
    fail_ensures: bool = False

    def requires(self, graph: Graph, am: AnalysisManager) -> None:
        if self.fail_requires:
            raise UsageError("contract: needs a miracle")

    def run(self, graph: Graph, am: AnalysisManager) -> PassResult:
        return PassResult(modified=False)

    def ensures(self, graph: Graph) -> None:
        if self.fail_ensures:
            raise KeyError("lost a node")


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
    assert isinstance(info.value, PostconditionError)  # the graph no longer verifies: a bug in the pass


def test_contract_modified_false_must_not_change_graph() -> None:
    with pytest.raises(PostconditionError, match="modified=False"):
        PassManager([Noop(lie=True)]).run(small_graph())
    PassManager([Noop()]).run(small_graph())


def test_preserved_names_analysis_classes_and_their_subclasses() -> None:
    with pytest.raises(TypeError, match="AnalysisPass classes"):
        PassResult(modified=True, preserved=frozenset({"count-nodes"}))  # type: ignore[arg-type]
    g = small_graph()
    am = AnalysisManager(g)
    am.get(CountNodes())
    am.get(CountedNodes())
    am.get(SparsityPass())
    am.invalidate(frozenset({CountNodes}))  # CountedNodes is a CountNodes: kept too
    assert {type(a) for a in am._cache} == {CountNodes, CountedNodes}
    am.invalidate("all")
    assert len(am._cache) == 2
    am.invalidate(frozenset())
    assert not am._cache


def test_precondition_error_keeps_history_and_exit_code() -> None:
    with pytest.raises(PreconditionError) as info:
        PassManager([MagnitudePass(sparsity=0.5), Contract(fail_requires=True)]).run(small_graph())
    err = info.value
    assert str(err) == "pass 'contract{fail_requires=true}' after [magnitude{sparsity=0.5}]: contract: needs a miracle"
    assert err.history == ("magnitude{sparsity=0.5}",) and err.pass_name == "contract{fail_requires=true}"
    assert err.exit_code == UsageError.exit_code and isinstance(err.__cause__, UsageError)
    with pytest.raises(PreconditionError, match="needs per-layer keep counts"):
        PassManager([DpaiPass()]).run(small_graph())


def test_postcondition_error_after_run() -> None:
    with pytest.raises(PostconditionError, match=r"^pass 'contract\{fail_ensures=true\}': 'lost a node'$") as info:
        PassManager([Contract(fail_ensures=True)]).run(small_graph())
    assert info.value.exit_code == 1 and info.value.history == ()
    PassManager([Contract()]).run(small_graph())


def test_sequential_runs_in_order_as_one_step() -> None:
    g = small_graph()
    timer = TimingInstrument()
    step = Sequential((MagnitudePass(sparsity=0.5), SparsityPass(), Noop()))
    records = PassManager([step, AddNeg()], instruments=[timer]).run(g)
    assert [r.spec for r in records] == ["sequential(magnitude{sparsity=0.5}, sparsity, noop)", "add-neg"]
    seq = records[0]
    assert seq.kind == "sequential" and seq.modified  # magnitude modified
    assert [c.spec for c in seq.children] == ["magnitude{sparsity=0.5}", "sparsity", "noop"]
    assert seq.children[1].result.kept == 6
    assert [r.spec for r in records[0].leaves()] == [name for name, _ in timer.timings[:3]]
    assert not PassManager([Sequential((Noop(),))]).run(small_graph())[0].modified
    with pytest.raises(PassError) as info:  # history counts the passes inside the step
        PassManager([Sequential((MagnitudePass(sparsity=0.5), Breaker()))]).run(small_graph())
    assert info.value.history == ("magnitude{sparsity=0.5}",) and info.value.pass_name == "breaker"


def test_fixpoint_reruns_its_body_until_unmodified() -> None:
    g = small_graph()
    records = PassManager([Fixpoint(NegUntil(nodes=7), max_rounds=4)]).run(g)
    assert len(g) == 7 and records[0].modified and records[0].kind == "fixpoint"
    assert [c.modified for c in records[0].children] == [True, True, True, False]
    records = PassManager([Fixpoint(NegUntil(nodes=7))]).run(g)  # already a fixpoint: one round
    assert not records[0].modified and len(records[0].children) == 1


def test_fixpoint_that_does_not_converge_fails_loudly() -> None:
    g = small_graph()
    with pytest.raises(PassError) as info:
        PassManager([Fixpoint(Sequential((Noop(), NegUntil(nodes=100))), max_rounds=3)]).run(g)
    assert "'sequential(noop, neg-until{nodes=100})' still changed after 3 rounds: no fixpoint" in str(info.value)
    assert info.value.pass_name.startswith("fixpoint(") and len(info.value.history) == 6
    assert isinstance(info.value.__cause__, FixpointError) and len(g) == 7
    with pytest.raises(UsageError, match="max_rounds"):
        Fixpoint(Noop(), max_rounds=0)


def test_iterate_to_fixpoint_counts_changing_rounds() -> None:
    left = [3]

    def step() -> bool:
        left[0] -= 1
        return left[0] >= 0

    assert iterate_to_fixpoint(step, max_rounds=4, what="countdown") == 3
    left[0] = 5
    with pytest.raises(FixpointError, match="countdown still changed after 4 rounds"):
        iterate_to_fixpoint(step, max_rounds=4, what="countdown")


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
