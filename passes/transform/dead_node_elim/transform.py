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
from pai_compiler.progress import PHASE_DELAY, Phases, metric_bar

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
            phases.begin(f"round {report.rounds + 1}: planning")
            cs = channel_spaces(graph)
            plan = plan_removal(graph, cs, fold=self.fold, align=self.align)
            if plan.empty:  # the last planning's kept-dead channels explain what stays
                report = report.with_kept_dead(tuple(plan.kept_dead.items()), tuple(plan.kept_dead_sources.items()))
                return False
            phases.begin(f"round {report.rounds + 1}: removing")
            report = report.then(apply_plan(graph, cs, plan))
            phases.tick()
            phases.note = f"{report.removed_atoms:,} channels removed"
            return True

        # rounds until a fixpoint: the bar's total is the cap, and it fills when the fixpoint is reached
        with metric_bar(am.context.progress, "[bold]dead-node-elim[/]", MAX_ROUNDS, unit="rounds", delay=PHASE_DELAY) as bar:
            phases = Phases(bar, MAX_ROUNDS)
            iterate_to_fixpoint(one_round, max_rounds=MAX_ROUNDS, what="dead-node-elim")
            phases.finish(f"fixpoint after {report.rounds} round(s) · {report.removed_atoms:,} channels removed")
        return PassResult(modified=report.applied, preserved=frozenset(), report=report)
