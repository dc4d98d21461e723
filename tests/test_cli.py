"""CLI contract: exit codes, one-line errors, atomic writes, untouched inputs, fast --help."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pai_compiler.cli import app

ROOT = Path(__file__).resolve().parents[1]
RESNET = ROOT / "examples" / "models" / "resnet20.onnx"


def paic(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "pai_compiler.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_help_and_version_do_not_import_torch() -> None:
    code = (
        "import sys\nfrom pai_compiler import cli\n"
        "for argv in (['--help'], ['optimize', '--help'], ['--version']):\n"
        "    try:\n        cli.app(argv)\n    except SystemExit as e:\n        assert e.code == 0, e.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', 'onnxruntime' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "NO-TORCH False", out.stdout + out.stderr


def test_optimize_demo_writes_model_and_report(tmp_path: Path) -> None:
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    res = paic("optimize", str(RESNET), "--sparsity", "0.95", "-o", str(out), "--report", str(report))
    assert res.returncode == 0, res.stderr
    for col in ("layer", "shape", "params", "kept", "density", "blocks.8.conv2.weight"):
        assert col in res.stdout
    doc = json.loads(report.read_text())
    assert doc["pipeline"] == "erk{sparsity=0.95},dpai"  # dpai is the default method
    assert abs(doc["after"]["density"] - 0.05) <= 0.001 and doc["before"]["density"] == 1.0
    assert len(doc["layers"]) == 22 and out.exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--sparsity", "0"], "sparsity must be in (0, 1)"),
        (["--sparsity", "1"], "sparsity must be in (0, 1)"),
        (["--sparsity", "-0.5"], "sparsity must be in (0, 1)"),
        (["--sparsity", "nan"], "NaN"),
        (["--sparsity", "abc"], "must be a number"),
        (["--sparsity", "0.9", "--method", "bogus"], "unknown pass 'bogus'"),
        (["--sparsity", "0.9", "--allocation", "row"], "--allocation"),
        (["--pipeline", "erk{sparsity=0.9},magnitude{scope=wrong}"], "scope"),
        ([], "--sparsity is required"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "o.onnx"
    res = paic("optimize", str(RESNET), "-o", str(out), *args)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    files = {"missing": tmp_path / "nope.onnx", "directory": tmp_path}
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "random.onnx").write_bytes(os.urandom(4096))
    (tmp_path / "truncated.onnx").write_bytes(RESNET.read_bytes()[:5000])
    files.update({k: tmp_path / f"{k}.onnx" for k in ("empty", "random", "truncated")})
    return files


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "random", "truncated"])
def test_bad_models_exit_1_with_one_line(tmp_path: Path, kind: str) -> None:
    bad = _bad_inputs(tmp_path)[kind]
    before = sha(bad) if bad.is_file() else None
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    res = paic("optimize", str(bad), "--sparsity", "0.9", "-o", str(out))
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert res.stderr.startswith("error:") and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert list(out.parent.iterdir()) == []
    if before is not None:
        assert sha(bad) == before


def test_output_equal_to_input_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(RESNET.read_bytes())
    before = sha(model)
    res = paic("optimize", str(model), "--sparsity", "0.9", "-o", str(model), "-m", "magnitude")
    assert res.returncode == 2 and "--force" in res.stderr and sha(model) == before
    res = paic("optimize", str(model), "--sparsity", "0.9", "-o", str(model), "--force", "-m", "magnitude")
    assert res.returncode == 0 and sha(model) != before


def test_unwritable_output(tmp_path: Path) -> None:
    res = paic("optimize", str(RESNET), "--sparsity", "0.9", "-o", str(tmp_path / "no" / "such" / "dir.onnx"))
    assert res.returncode == 1 and "does not exist" in res.stderr


@pytest.mark.parametrize("where", ["stream", "save_model"])
def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    import onnx

    from pai_compiler.backends import onnx_masked, onnx_stream

    def half_write(model: object, path: str, *a: object, **k: object) -> None:
        Path(path).write_bytes(b"\x08\x07half a model")  # a partial file, then the disk "fails"
        raise OSError(28, "No space left on device")

    def half_copy(src: int, dst: int, offset: int, length: int) -> None:
        os.write(dst, b"\x08\x07half")
        raise OSError(28, "No space left on device")

    if where == "stream":  # the usual path: initializer weights streamed from the source file
        monkeypatch.setattr(onnx_stream, "_copy_range", half_copy)
    else:  # the general path (load, edit, save), forced by making the stream refuse
        monkeypatch.setattr(onnx_masked, "_streamable", lambda *a: False)
        monkeypatch.setattr(onnx, "save_model", half_write)
    out = tmp_path / "o.onnx"
    res = CliRunner().invoke(app, ["optimize", str(RESNET), "--sparsity", "0.9", "-o", str(out), "-m", "magnitude"])
    assert res.exit_code == 1 and "No space left" in res.output
    assert list(tmp_path.iterdir()) == []


def test_exclude_keeps_layers_dense_and_passes_lists(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    res = CliRunner().invoke(app, ["optimize", str(RESNET), "--sparsity", "0.9", "-o", str(out), "-m", "magnitude", "--exclude", "fc*", "--exclude", "conv.weight", "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "r.json").read_text())
    names = [row["name"] for row in doc["layers"]]
    assert "fc.weight" not in names and "conv.weight" not in names and len(names) == 20
    assert sorted(doc["excluded"]) == ["conv.weight", "fc.weight"]
    res = CliRunner().invoke(app, ["passes"])
    assert res.exit_code == 0 and "erk" in res.output and "magnitude" in res.output


def test_print_ir_after_all(tmp_path: Path) -> None:
    res = paic("optimize", str(RESNET), "--sparsity", "0.9", "-o", str(tmp_path / "o.onnx"), "-m", "magnitude", "--print-ir-after-all", "--quiet")
    assert res.returncode == 0 and res.stdout == ""
    assert res.stderr.count("// ----- IR after") == 2 and "kept" in res.stderr
