"""Long DPaI and SynFlow phases report live metrics to a rich bar on stderr (terminals only)."""
from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.pass_infra import AnalysisManager, PassManager, RunContext
from pai_compiler.pipeline import parse_pipeline
from pai_compiler.progress import metric_bar

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"


def test_metric_bar_draws_rate_and_metrics_on_a_terminal_only() -> None:
    drawn = io.StringIO()
    with metric_bar(True, "dpai", 4, console=Console(file=drawn, force_terminal=True, width=160)) as bar:
        assert bar is not None
        for step in range(1, 5):
            bar(step, f"log P {step:.2f} · nodes {10 * step}")
    text = drawn.getvalue()
    assert "4/4" in text and "steps/s" in text and "log P 4.00 · nodes 40" in text
    piped = io.StringIO()
    with metric_bar(True, "dpai", 4, console=Console(file=piped, width=160)) as bar:
        assert bar is None  # not a terminal: nothing is drawn
    with metric_bar(False, "dpai", 4) as bar:
        assert bar is None
    assert piped.getvalue() == ""


@pytest.mark.parametrize("spec,label,needles", [
    ("erk{sparsity=0.99},dpai{steps=60}", "dpai", ("log P", "nodes", "kernels")),
    ("synflow{sparsity=0.9,iterations=5}", "synflow", ("log R", "kept")),
])
def test_passes_feed_live_metrics_only_when_asked(monkeypatch: pytest.MonkeyPatch, spec: str, label: str, needles: tuple[str, ...]) -> None:
    import pai_compiler.passes.criteria.dpai.criterion as dpai_module
    import pai_compiler.passes.criteria.synflow as synflow_module

    calls: list[tuple[bool, str, int, list[tuple[int, str]]]] = []

    @contextlib.contextmanager
    def recording(enabled: bool, title: str, total: int, unit: str = "steps", console: Any = None) -> Iterator[Any]:
        updates: list[tuple[int, str]] = []
        calls.append((enabled, title, total, updates))
        yield (lambda done, metrics: updates.append((done, metrics))) if enabled else None

    monkeypatch.setattr(dpai_module, "metric_bar", recording)
    monkeypatch.setattr(synflow_module, "metric_bar", recording)
    for progress in (False, True):
        graph = load_onnx_model(EXAMPLES / "resnet20.onnx")
        PassManager(parse_pipeline(spec)).run(graph, AnalysisManager(graph, RunContext(seed=0, progress=progress)))
    (quiet, *_), (enabled, title, total, updates) = calls
    assert quiet is False and enabled is True and label in title
    assert updates[-1][0] == total and len(updates) >= 3
    assert all(needle in updates[-1][1] for needle in needles)
