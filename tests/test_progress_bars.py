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


# ---- every long phase: load, audit, NPB, compaction, kernel timing, --align auto, bench --------------------------------

BAR_MODULES = (
    "pai_compiler.frontends.onnx.reader", "pai_compiler.passes.analysis.node_path", "pai_compiler.passes.criteria.npb.criterion",
    "pai_compiler.passes.transform.dead_node_elim.transform", "pai_compiler.backends.sparse_select", "pai_compiler.bench",
    "pai_compiler.align_choice", "pai_compiler.frontends.torch.spec", "pai_compiler.passes.criteria.dpai.criterion",
    "pai_compiler.passes.criteria.synflow",
)


class Recorded(list):  # type: ignore[type-arg]
    """Every metric_bar opened: dicts of enabled, label, total, unit, delay, timed and the updates it got."""

    def asked(self) -> list[dict[str, Any]]:
        return [call for call in self if call["enabled"]]


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Recorded:
    import importlib

    calls = Recorded()

    @contextlib.contextmanager
    def recording(enabled: bool, label: str, total: int, unit: str = "steps", console: Any = None, *,
                  delay: float = 0.0, timed: bool = False) -> Iterator[Any]:
        call: dict[str, Any] = {"enabled": enabled, "label": label, "total": total, "unit": unit, "delay": delay, "timed": timed, "updates": []}
        calls.append(call)
        yield (lambda done, metrics: call["updates"].append((done, metrics))) if enabled else None

    for name in BAR_MODULES:
        monkeypatch.setattr(importlib.import_module(name), "metric_bar", recording)
    return calls


def test_a_delayed_bar_stays_silent_on_quick_work_and_a_timed_one_redraws_on_updates() -> None:
    drawn = io.StringIO()
    with metric_bar(True, "load", 3, console=Console(file=drawn, force_terminal=True, width=160), delay=60.0) as bar:
        assert bar is not None
        for done in range(1, 4):
            bar(done, "lowering")
    assert drawn.getvalue() == ""  # quicker than the delay: never drawn
    with metric_bar(True, "kernels", 3, unit="layers", console=Console(file=drawn, force_terminal=True, width=160), timed=True) as bar:
        assert bar is not None
        for done in range(1, 4):
            bar(done, f"conv{done} -> csr/index" if done < 3 else "")
    text = drawn.getvalue()
    assert "3/3" in text and "layers/s" in text and "conv2 -> csr/index" in text  # "" kept the last metrics


def test_phases_count_units_over_named_phases_capped_at_the_total() -> None:
    from pai_compiler.progress import Phases

    seen: list[tuple[int, str]] = []
    phases = Phases(lambda done, metrics: seen.append((done, metrics)), 4, every=2)
    phases.begin("lowering", "resnet")
    phases.tick()  # 1: not a multiple of 2, not drawn
    phases.tick()
    phases.begin("verify")
    phases.tick(5)
    phases.finish("done")
    assert seen == [(0, "lowering · resnet"), (2, "lowering · resnet"), (2, "verify · resnet"), (4, "verify · resnet"), (4, "verify · done")]
    Phases(None, 4).tick()  # no bar: free


def _sparse_onnx(path: Path) -> Path:
    from pai_compiler import api

    result = api.optimize(str(EXAMPLES / "resnet20.onnx"), sparsity=0.95, method="magnitude")
    api.save_model(result, EXAMPLES / "resnet20.onnx", path)
    return path


def _compacted() -> Any:
    from pai_compiler import api

    result = api.optimize(str(EXAMPLES / "vgg_small.onnx"), sparsity=0.9, method="magnitude")
    api.compact_graph(result.graph)
    return result.graph


def _torch_load(tmp_path: Path, progress: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    import pai_compiler.frontends.torch.spec as spec

    monkeypatch.setattr(spec, "TRACE_BAR_PARAMS", 0)  # the tiny module counts as big
    (tmp_path / "net.py").write_text("import torch.nn as nn\nNet = lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))\n")
    return spec.load_torch_spec(f"{tmp_path / 'net.py'}:Net", input_shape="2,4", progress=progress)


def _load(tmp: Path, progress: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    return load_onnx_model(EXAMPLES / "resnet20.onnx", progress=progress)


def _audit(tmp: Path, progress: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    from pai_compiler.audit import audit_graph

    return audit_graph(load_onnx_model(EXAMPLES / "resnet20.onnx"), progress=progress)


def _npb(tmp: Path, progress: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    graph = load_onnx_model(EXAMPLES / "vgg_small.onnx")
    return PassManager(parse_pipeline("erk{sparsity=0.99},npb")).run(graph, AnalysisManager(graph, RunContext(seed=0, progress=progress)))


def _dead_node_elim(tmp: Path, progress: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    from pai_compiler import api

    return api.compact_graph(api.optimize(str(EXAMPLES / "vgg_small.onnx"), sparsity=0.99, method="synflow").graph, progress=progress)


def _sparse_kernels(tmp: Path, progress: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    from pai_compiler.backends.sparse_select import build_sparse_module

    return build_sparse_module(_compacted(), repeats=1, warmup=0, progress=progress)


def _bench(tmp: Path, progress: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    from pai_compiler.bench import bench_models

    return bench_models([str(EXAMPLES / "resnet20.onnx")] * 2, repeats=3, warmup=0, progress=progress)


def _align_auto(tmp: Path, progress: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    from pai_compiler.align_choice import choose_align

    return choose_align(_sparse_onnx(tmp / f"sparse{progress}.onnx"), tmp / f"out{progress}.onnx", repeats=2, warmup=0, progress=progress)


#: bar label -> (the work, given tmp_path, progress and monkeypatch; text its updates must show)
PHASES = {
    "load": (_load, ("verify", "IR nodes")),
    "paths": (_audit, ("log P",)),
    "npb": (_npb, ("kept", "allocated")),
    "dead-node-elim": (_dead_node_elim, ("fixpoint", "channels removed")),
    "sparse kernels": (_sparse_kernels, ("sparse of", "ms")),
    "bench": (_bench, ("resnet20.onnx", "ms")),
    "align auto": (_align_auto, ("align 8:", "params")),
    "load[/] Net": (_torch_load, ("tracing with torch.fx", "IR nodes (fx)")),
}


@pytest.mark.parametrize("label", list(PHASES))
def test_each_long_phase_feeds_its_bar_only_when_asked(recorded: Recorded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, label: str) -> None:
    work, needles = PHASES[label]
    work(tmp_path, False, monkeypatch)
    assert recorded and not recorded.asked()  # the Python API stays silent unless asked
    recorded.clear()
    work(tmp_path, True, monkeypatch)
    ours = [call for call in recorded.asked() if label in call["label"]]
    assert ours, [call["label"] for call in recorded]
    updates = [u for call in ours for u in call["updates"]]
    assert updates and ours[-1]["updates"][-1][0] == ours[-1]["total"]
    assert all(done <= call["total"] for call in ours for done, _ in call["updates"])
    assert all(needle in " ".join(text for _, text in updates) for needle in needles), updates[-3:]
    if label in ("sparse kernels", "bench", "align auto"):  # timing: no refresh thread beside the timed code
        assert any(call["timed"] for call in ours)


def test_bars_never_change_a_result(tmp_path: Path) -> None:
    from pai_compiler.audit import audit_graph

    graph = load_onnx_model(EXAMPLES / "resnet20.onnx", progress=True)
    assert audit_graph(graph, progress=True) == audit_graph(load_onnx_model(EXAMPLES / "resnet20.onnx"))


def _cli_bars(recorded: Recorded, *args: str) -> list[bool]:
    from typer.testing import CliRunner

    from pai_compiler.cli import app

    recorded.clear()
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert recorded, args
    return [call["enabled"] for call in recorded]


def test_cli_asks_for_bars_unless_quiet_or_json(recorded: Recorded, tmp_path: Path) -> None:
    model = str(EXAMPLES / "vgg_small.onnx")
    sparse = str(_sparse_onnx(tmp_path / "sparse.onnx"))
    bench = ["bench", model, model, "--repeats", "2", "--warmup", "0"]
    assert any(_cli_bars(recorded, "audit", model))
    assert not any(_cli_bars(recorded, "audit", model, "-q"))
    assert not any(_cli_bars(recorded, "audit", model, "--json"))
    assert any(_cli_bars(recorded, *bench))
    assert not any(_cli_bars(recorded, *bench, "--json"))
    assert not any(_cli_bars(recorded, *bench, "--quiet"))
    assert any(_cli_bars(recorded, "compact", sparse, "-o", str(tmp_path / "c.onnx")))
    assert not any(_cli_bars(recorded, "compact", sparse, "-o", str(tmp_path / "c2.onnx"), "-q"))
    optimize = ["optimize", model, "-s", "0.9", "-m", "npb", "-o"]
    assert any(_cli_bars(recorded, *optimize, str(tmp_path / "o.onnx")))
    assert not any(_cli_bars(recorded, *optimize, str(tmp_path / "o2.onnx"), "-q"))


def test_a_piped_stderr_gets_no_bar(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    cmd = [sys.executable, "-m", "pai_compiler.cli", "optimize", str(EXAMPLES / "vgg_small.onnx"), "-s", "0.99", "--steps", "60", "-o"]
    piped = subprocess.run([*cmd, str(tmp_path / "p.onnx")], capture_output=True, text=True, env=env, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == "" and "steps/s" not in piped.stdout
    # the same run on what rich takes for a terminal draws the DPaI bar on stderr (so the check above can fail)
    forced = subprocess.run([*cmd, str(tmp_path / "f.onnx")], capture_output=True, text=True, env={**env, "FORCE_COLOR": "1", "COLUMNS": "250"},
                            timeout=300)
    assert forced.returncode == 0, forced.stderr
    assert "60/60" in forced.stderr and "steps/s" in forced.stderr and "steps/s" not in forced.stdout
