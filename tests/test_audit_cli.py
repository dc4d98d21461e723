"""``paic audit`` and ``audit_graph``: the JSON contract, --no-paths without torch, plots, errors."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pai_compiler.audit import audit_graph, render_audit
from pai_compiler.cli import app
from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.ir import Graph, GraphBuilder

ROOT = Path(__file__).resolve().parents[1]
RESNET = ROOT / "examples" / "models" / "resnet20.onnx"
TOTALS = [
    "params", "nonzero_params", "density", "macs_dense", "macs_nonzero", "macs_effective", "log_paths",
    "log_paths_dpai", "effective_params", "effective_nodes", "effective_nodes_npb", "effective_kernels", "total_nodes",
    "macs_by_kind",
]
LAYER = [
    "name", "op", "shape", "params", "nonzero", "density", "macs_dense", "macs_nonzero", "macs_effective",
    "effective_nodes", "total_nodes", "effective_kernels",
]
PATH_KEYS = ["macs_effective", "log_paths", "log_paths_dpai", "effective_params", "effective_nodes", "effective_nodes_npb", "effective_kernels"]


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.output


@pytest.mark.parametrize("paths", [True, False])
def test_document_keys_are_exactly_the_contract(example_model: Path, paths: bool) -> None:
    g = load_onnx_model(example_model)
    doc = audit_graph(g, paths=paths)
    assert list(doc) == ["model", "totals", "layers", "warnings"]
    assert list(doc["totals"]) == TOTALS
    assert doc["model"] == example_model.stem and doc["warnings"] == []
    assert len(doc["layers"]) == len(g.weighted_nodes())
    for row in doc["layers"]:
        assert list(row) == LAYER
    assert [row["name"] for row in doc["layers"]] == [p.name for p in g.prunable_params()]
    totals = doc["totals"]
    assert totals["params"] == sum(row["params"] for row in doc["layers"]) and totals["density"] == 1.0
    assert totals["total_nodes"] == sum(row["total_nodes"] for row in doc["layers"])
    assert sum(totals["macs_by_kind"].values()) == totals["macs_dense"] and totals["macs_by_kind"]["conv"] > 0
    assert all((totals[k] is None) != paths for k in PATH_KEYS)
    json.dumps(doc, allow_nan=False)  # strict JSON


def test_pruned_resnet20_is_consistent() -> None:
    from pai_compiler import api

    result = api.optimize(str(RESNET), sparsity=0.99, method="random", allocation="erk")
    doc = audit_graph(result.graph, bind={"batch": 8})
    t = doc["totals"]
    assert t["nonzero_params"] == sum(p.kept() for p in result.graph.prunable_params())
    assert t["effective_params"] <= t["nonzero_params"] and t["effective_nodes"] <= t["total_nodes"] == 794
    assert t["macs_effective"] <= t["macs_nonzero"] < t["macs_dense"] == 8 * 41_292_416
    assert sum(row["effective_nodes"] for row in doc["layers"]) == t["effective_nodes"]
    assert sum(row["effective_kernels"] for row in doc["layers"]) == t["effective_kernels"]
    assert math.isfinite(t["log_paths"]) and t["log_paths_dpai"] > t["log_paths"]  # skip-weighted on ResNets
    from rich.console import Console

    console = Console(record=True, width=200)
    render_audit(doc, console)
    text = console.export_text()
    assert "blocks.8.conv2.weight" in text and "effective_nodes_npb" in text


def test_cli_json_bind_and_tables() -> None:
    code, out = run_cli("audit", str(RESNET), "--json", "--bind", "batch=32")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["totals"]["macs_dense"] == 32 * 41_292_416
    assert doc["totals"]["log_paths"] == pytest.approx(113.5972, abs=1e-4)
    code, out = run_cli("audit", str(RESNET), "--no-paths")
    assert code == 0 and "blocks.3.shortcut.0.weight" in out and "macs_dense" in out


def test_no_paths_never_imports_torch_or_sympy() -> None:
    # a dynamic-batch model: without --bind its dims are bound at load, so sympy (0.3 s) never loads
    code = (
        "import sys, json\nfrom typer.testing import CliRunner\nfrom pai_compiler.cli import app\n"
        f"r = CliRunner().invoke(app, ['audit', {str(RESNET)!r}, '--no-paths', '--json'])\n"
        "assert r.exit_code == 0, r.output\nassert json.loads(r.output)['totals']['log_paths'] is None\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnxruntime', 'sympy', 'pydantic')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cli_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / "audit.png"
    code, out = run_cli("audit", str(RESNET), "--plot", str(target), "--no-paths")
    assert code == 0, out
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "exit_code", "needle"),
    [
        (["missing.onnx"], 1, "missing.onnx: no such file"),
        ([str(RESNET), "--bind", "batch"], 2, "bad binding 'batch'"),
        ([str(RESNET), "--plot", "/no/such/folder/x.png"], 1, "folder /no/such/folder does not exist"),
        ([str(RESNET), "--plot", str(RESNET)], 2, "refusing to overwrite"),
    ],
)
def test_cli_errors_are_one_line(args: list[str], exit_code: int, needle: str) -> None:
    code, out = run_cli("audit", *args)
    assert code == exit_code and needle in out and len(out.strip().splitlines()) == 1, out


def chain(zero_last: bool = False, opaque: bool = False) -> Graph:
    b = GraphBuilder("chain")
    w1 = np.arange(16, dtype=np.float32).reshape(4, 4)  # one zero weight: an already-sparse model
    h = b.linear(b.input((1, 4)), 4, weight=b.param("fc1.weight", (4, 4), data=w1))
    if opaque:
        h = b.opaque([h], (1, 4), "Weird")
    w2 = np.zeros((2, 4), np.float32) if zero_last else np.ones((2, 4), np.float32)
    return b.build(b.linear(h, 2, weight=b.param("fc2.weight", (2, 4), data=w2)))


def test_zero_weights_act_as_masks_and_the_graph_is_left_alone() -> None:
    g = chain()
    version = g.version
    doc = audit_graph(g)
    assert doc["totals"]["nonzero_params"] == 23 and doc["totals"]["effective_params"] == 23
    assert doc["totals"]["log_paths"] == pytest.approx(math.log(15 * 2))
    assert any("1 zero weight(s) in 1 unmasked layer(s)" in w for w in doc["warnings"])
    assert all(p.mask is None for p in g.prunable_params()) and g.version >= version


def test_no_surviving_path_is_null_with_a_warning() -> None:
    doc = audit_graph(chain(zero_last=True))
    assert doc["totals"]["log_paths"] is None and doc["totals"]["effective_params"] == 0
    assert any("all zeros" in w for w in doc["warnings"]) and any("log_paths is -inf" in w for w in doc["warnings"])
    json.dumps(doc, allow_nan=False)


def test_opaque_node_nulls_paths_and_warns() -> None:
    doc = audit_graph(chain(opaque=True))
    t = doc["totals"]
    assert t["log_paths"] is None and t["effective_nodes"] is None and t["total_nodes"] == 6
    assert t["macs_effective"] == t["macs_nonzero"] == 15 + 8
    assert any("'opaque1' is opaque (Weird)" in w and "path analysis skipped" in w for w in doc["warnings"])
    assert any("macs_effective equals macs_nonzero" in w for w in doc["warnings"])
