"""The floors of DESIGN.md hold: no import cycle, no upward import, no private cross-package import.

Every ``import`` statement of the package counts, module-level and function-local
(``scripts/import_graph.py`` parses them; run it for the counts).
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
assert _spec is not None and _spec.loader is not None
import_graph = importlib.util.module_from_spec(_spec)
sys.modules["import_graph"] = import_graph
_spec.loader.exec_module(import_graph)


def test_no_import_cycles() -> None:
    _, edges = import_graph.all_imports()
    assert import_graph.cycles(edges) == []


def test_no_floor_violations() -> None:
    _, edges = import_graph.all_imports()
    assert import_graph.violations(edges) == []


def test_the_checker_sees_a_violation() -> None:
    """The checker itself works: an upward and a private import are reported, a cycle is found."""
    Import = import_graph.Import
    edges = [Import("pai_compiler.ir.core", "pai_compiler.api", 1, False),
             Import("pai_compiler.lab.training", "pai_compiler.passes.criteria.dpai.layout", 2, True, "_private"),
             Import("pai_compiler.backends.onnx_masked", "pai_compiler.frontends.onnx.reader", 3, True),
             Import("pai_compiler.passes.analysis.flops", "pai_compiler.passes.analysis.node_path", 4, False),
             Import("pai_compiler.passes.analysis.node_path", "pai_compiler.passes.analysis.flops", 5, True)]
    found = import_graph.violations(edges)
    assert any(f.startswith("upward import: pai_compiler.ir.core:1") for f in found)
    assert any("private name '_private'" in f for f in found)
    assert any(f.startswith("frontend/backend import") for f in found)
    assert import_graph.cycles(edges) == [["pai_compiler.passes.analysis.flops", "pai_compiler.passes.analysis.node_path"]]


def test_light_floors_do_not_import_torch() -> None:
    code = "import sys, pai_compiler.ir, pai_compiler.pass_infra; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
