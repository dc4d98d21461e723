"""Packaging: passes/ and frontends/ install as pai_compiler.passes / pai_compiler.frontends
(editable install and built wheel), and a plugin registers a pass through `paic.passes`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = (
    "import pai_compiler, pai_compiler.passes.allocation.erk as e, pai_compiler.frontends.onnx.reader as f;"
    "print(pai_compiler.__file__); print(e.__file__); print(f.__file__)"
)


def _run(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)  # type: ignore[call-overload]


def test_every_subpackage_is_listed_in_pyproject() -> None:
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for top, installed in (("pai_compiler", "pai_compiler"), ("passes", "pai_compiler.passes"), ("frontends", "pai_compiler.frontends")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((installed, *rel)))
    assert found == listed


def test_editable_install_maps_source_folders(tmp_path: Path) -> None:
    out = _run([sys.executable, "-c", PROBE], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    pkg, erk, onnx_fe = out.stdout.split()
    assert Path(erk) == ROOT / "passes" / "allocation" / "erk.py"
    assert Path(onnx_fe) == ROOT / "frontends" / "onnx" / "reader.py"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    src = tmp_path_factory.mktemp("src") / "paic"  # a clean copy: no stale build/ folder can leak in
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", "build", "*.egg-info", ".git", "__pycache__", "*.onnx"))
    res = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)])
    assert res.returncode == 0, res.stderr
    return next(dist.glob("paic-*.whl"))


def test_wheel_contains_mapped_packages(wheel: Path, tmp_path: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {f"pai_compiler/{p.relative_to(ROOT).as_posix()}" for folder in ("passes", "frontends")
               for p in (ROOT / folder).rglob("*.py")}
    sources |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "pai_compiler").rglob("*.py")}
    sources.add("pai_compiler/passes/criteria/autosparse/default_predictor.npz")
    assert sources - names == set(), "modules missing from the wheel (pyproject packages list)"
    assert not any(n.startswith(("passes/", "frontends/", "tests/")) for n in names)
    target = tmp_path / "site"
    res = _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)])
    assert res.returncode == 0, res.stderr
    env = dict(os.environ, PYTHONPATH=str(target))
    out = _run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    for path in out.stdout.split():
        assert Path(path).is_relative_to(target), path


def test_plugin_registers_a_pass(tmp_path: Path) -> None:
    target = tmp_path / "site"
    res = _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(ROOT / "examples" / "custom_pass")])
    assert res.returncode == 0, res.stderr
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="1")
    code = (
        "from pai_compiler.registry import available_passes\n"
        "from pai_compiler.api import optimize\n"
        "assert 'kernel-l1' in available_passes()\n"
        f"r = optimize({str(ROOT / 'examples/models/resnet20.onnx')!r}, pipeline='erk{{sparsity=0.9}},kernel-l1{{scope=layer}}')\n"
        "p = r.graph.prunable_params()[1]\n"
        "import numpy as np\n"
        "k = p.mask.reshape(p.shape[0], p.shape[1], -1)\n"
        "full = (k.all(-1)).sum(); partial = (k.any(-1) & ~k.all(-1)).sum()\n"
        "print(r.pipeline, full, partial)\n"
    )
    out = _run([sys.executable, "-c", code], env=env)
    assert out.returncode == 0, out.stderr
    pipeline, full, partial = out.stdout.split()
    assert pipeline == "erk{sparsity=0.9},kernel-l1{scope=layer}"
    assert int(full) > 0 and int(partial) <= 1  # whole kernels kept: at most one partly filled
