"""DPaI's latency knob: ``latency=λ`` runs with alpha (1 - λ), trading effective nodes for dead channels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pai_compiler.errors import UsageError
from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.ir import Graph
from pai_compiler.pass_infra import AnalysisManager, PassManager, RunContext
from pai_compiler.passes.analysis.node_path import NodePathPass
from pai_compiler.passes.criteria.dpai.outcome import DpaiReport
from pai_compiler.passes.transform.dead_node_elim import DeadNodeElimPass
from pai_compiler.pipeline import parse_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
PIPELINE = "erk{{sparsity=0.99}},dpai{{steps=60,lr=0.05,{options}}}"


def _pruned(options: str) -> tuple[Graph, DpaiReport]:
    graph = load_onnx_model(EXAMPLES / "resnet20.onnx")
    records = PassManager(parse_pipeline(PIPELINE.format(options=options))).run(graph, AnalysisManager(graph, RunContext(seed=0)))
    report = records[-1].report
    assert isinstance(report, DpaiReport)
    return graph, report


def _masks(graph: Graph) -> dict[str, np.ndarray]:
    return {p.name: p.mask_or_ones().copy() for p in graph.prunable_params()}


def test_latency_is_alpha_scaled_bit_for_bit() -> None:
    knob, knob_report = _pruned("latency=0.5")
    plain, plain_report = _pruned(f"alpha={0.99 * 0.5!r}")
    assert knob_report.alpha == plain_report.alpha == pytest.approx(0.495)
    a, b = _masks(knob), _masks(plain)
    assert all(np.array_equal(a[name], b[name]) for name in a)
    published, report = _pruned("latency=0")
    assert report.alpha == 0.99
    default, _ = _pruned("seed=0")
    assert all(np.array_equal(m, _masks(default)[name]) for name, m in _masks(published).items())


def test_latency_trades_nodes_for_dead_channels() -> None:
    """Fewer effective nodes and a smaller compact model than the published objective, same budgets."""
    rows = {}
    for latency in (0.0, 0.5):
        graph, _ = _pruned(f"latency={latency}")
        kept = [p.kept() for p in graph.prunable_params()]
        nodes = NodePathPass().run(graph, AnalysisManager(graph)).effective_nodes
        PassManager([DeadNodeElimPass()]).run(graph)
        rows[latency] = (kept, nodes, sum(p.numel for p in graph.prunable_params()))
    assert rows[0.5][0] == rows[0.0][0]  # per-layer budgets unchanged
    assert rows[0.5][1] < rows[0.0][1]
    assert rows[0.5][2] < rows[0.0][2]


@pytest.mark.parametrize("bad", ["-0.1", "1.5"])
def test_latency_out_of_range_is_a_usage_error(bad: str) -> None:
    with pytest.raises(UsageError, match="latency must be in"):
        parse_pipeline(f"dpai{{latency={bad}}}")
