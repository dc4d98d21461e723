"""The dead-node-elim pass: plan and apply removal rounds until a round finds nothing (a fixpoint).

A grouped conv left with one group no longer ties its input channels together, which frees
more of them, so the pass repeats; running it twice changes nothing. Its PassResult.report is
the CompactReport of all its rounds (``rounds == 0`` when nothing was dead).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pai_compiler.errors import UsageError
from pai_compiler.ir import Graph
from pai_compiler.pass_infra import AnalysisManager, PassResult, TransformPass, iterate_to_fixpoint
from pai_compiler.passes.analysis.coupling import channel_spaces
from pai_compiler.passes.transform.dead_node_elim.apply import apply_plan
from pai_compiler.passes.transform.dead_node_elim.plan import plan_removal
from pai_compiler.passes.transform.dead_node_elim.report import CompactReport

__all__ = ["DeadNodeElimPass", "MAX_ROUNDS"]

MAX_ROUNDS = 16  # rounds of plan + apply; more means a bug (each round only unties groups further)


@dataclass(frozen=True)
class DeadNodeElimPass(TransformPass):
    """Remove dead channels/neurons (folding constant ones into biases); function unchanged."""

    name: ClassVar[str] = "dead-node-elim"
    fold: bool = True
    align: int = 1

    def __post_init__(self) -> None:
        if self.align < 1:
            raise UsageError(f"dead-node-elim: align must be a positive integer, got {self.align}")

    def run(self, graph: Graph, am: AnalysisManager) -> PassResult:
        report = CompactReport()

        def one_round() -> bool:
            nonlocal report
            cs = channel_spaces(graph)
            plan = plan_removal(graph, cs, fold=self.fold, align=self.align)
            if plan.empty:  # the last planning's kept-dead channels explain what stays
                report = report.with_kept_dead(tuple(plan.kept_dead.items()), tuple(plan.kept_dead_sources.items()))
                return False
            report = report.then(apply_plan(graph, cs, plan))
            return True

        iterate_to_fixpoint(one_round, max_rounds=MAX_ROUNDS, what="dead-node-elim")
        return PassResult(modified=report.applied, preserved=frozenset(), report=report)
