"""``--align auto``: exact candidates, the choice follows the timings (fixed here), the report block, usage errors.

Wall-clock times are never asserted: the choice tests replace the medians ``bench_models``
measures with fixed ones (its outputs and their agreement stay real).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from pai_compiler import align_choice
from pai_compiler.align_choice import ALIGN_CANDIDATES, EXACT_REL, choose_align
from pai_compiler.cli_app import parse_align_flag as parse_align
from pai_compiler.bench import BenchResult, bench_models
from pai_compiler.cli import app
from pai_compiler.errors import UsageError

BLOCK_KEYS = {"candidates", "masked_ms", "chosen", "batch", "threads", "runtime", "repeats", "warmup", "max_rel_allowed"}


def _sparse_convnet(path: Path, seed: int = 0, dims: tuple[object, ...] = ("N", 3, 8, 8)) -> Path:
    """Conv 3->10 (3 dead filters) -> Relu -> Conv 10->6 (1 dead filter) -> Relu -> GlobalAveragePool -> Flatten -> Gemm 6->5."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((10, 3, 3, 3)) * (rng.random((10, 3, 3, 3)) < 0.6)).astype(np.float32)
    w1[[1, 4, 7]] = 0.0
    w2 = (rng.standard_normal((6, 10, 3, 3)) * (rng.random((6, 10, 3, 3)) < 0.5)).astype(np.float32)
    w2[2] = 0.0
    b1 = rng.standard_normal(10).astype(np.float32) * 0.1
    b1[[1, 4, 7]] = 0.0  # dead filters with no bias: their channel is zero
    fc = rng.standard_normal((5, 6)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["h2"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (fc, "fc"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _fixed_medians(monkeypatch: pytest.MonkeyPatch, medians: list[float]) -> list[dict[str, Any]]:
    """Make ``choose_align``'s timing report ``medians`` (masked first, then the candidates); returns the calls seen."""
    calls: list[dict[str, Any]] = []

    def timed(models: list[str], **kwargs: Any) -> BenchResult:
        calls.append({"models": list(models), **kwargs})
        real = bench_models(models, batch=kwargs.get("batch"), threads=kwargs.get("threads", 1), repeats=1, warmup=0)
        rows = tuple(dataclasses.replace(row, median_ms=ms) for row, ms in zip(real.rows, medians, strict=True))
        return dataclasses.replace(real, rows=rows)

    monkeypatch.setattr(align_choice, "bench_models", timed)
    return calls


def _leftovers(folder: Path, *keep: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p not in keep)


def test_every_candidate_is_exact_and_the_output_matches_the_masked_model(tmp_path: Path) -> None:
    source = _sparse_convnet(tmp_path / "sparse.onnx")
    out = tmp_path / "out.onnx"
    choice = choose_align(source, out, repeats=1, warmup=0)
    assert [c.align for c in choice.candidates] == list(ALIGN_CANDIDATES)
    assert all(0.0 <= c.max_rel <= EXACT_REL for c in choice.candidates)
    params = {c.align: c.params for c in choice.candidates}
    assert params[1] < params[4] <= params[8]  # align 1 drops every dead filter; 4 and 8 keep some
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    ref = _run(source, x)
    np.testing.assert_allclose(_run(out, x), ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))
    assert _leftovers(tmp_path, source, out) == []  # every temporary candidate is gone


@pytest.mark.parametrize("favoured", [1, 4, 8])
def test_the_written_file_is_the_candidate_the_timings_favour(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, favoured: int) -> None:
    source = _sparse_convnet(tmp_path / "sparse.onnx")
    expected = tmp_path / "expected.onnx"
    align_choice._compact_candidate(str(source), expected, favoured, "")
    medians = [5.0] + [1.0 if align == favoured else 2.0 for align in ALIGN_CANDIDATES]
    calls = _fixed_medians(monkeypatch, medians)
    out = tmp_path / "out.onnx"
    choice = choose_align(source, out, batch=2, threads=1)
    assert choice.chosen == favoured and calls[0]["batch"] == 2 and calls[0]["models"][0] == str(source)
    assert out.read_bytes() == expected.read_bytes()
    assert _leftovers(tmp_path, source, out, expected) == []


def test_a_masked_model_faster_than_every_candidate_is_written_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _sparse_convnet(tmp_path / "sparse.onnx")
    _fixed_medians(monkeypatch, [1.0, 1.5, 1.2, 1.3])
    out = tmp_path / "out.onnx"
    choice = choose_align(source, out)
    assert choice.chosen is None and choice.to_dict()["chosen"] == "masked"
    assert out.read_bytes() == source.read_bytes()
    assert "stays dense" in align_choice.choice_line(choice.to_dict())


def test_a_tie_with_the_masked_model_keeps_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _sparse_convnet(tmp_path / "sparse.onnx")
    _fixed_medians(monkeypatch, [1.0, 1.0, 1.0, 1.0])
    assert choose_align(source, tmp_path / "out.onnx").chosen is None  # never slower: only a faster candidate replaces it


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})


@pytest.mark.parametrize(("medians", "chosen", "needle"), [([3.0, 2.0, 1.0, 2.5], 4, "chose align 4"),
                                                           ([1.0, 2.0, 3.0, 4.0], "masked", "stays dense")])
def test_cli_compact_align_auto_reports_its_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, medians: list[float],
                                                   chosen: object, needle: str) -> None:
    source = _sparse_convnet(tmp_path / "sparse.onnx")
    _fixed_medians(monkeypatch, medians)
    out, report = tmp_path / "c.onnx", tmp_path / "r.json"
    result = _cli("compact", str(source), "-o", str(out), "--align", "auto", "--threads", "1", "--batch", "2", "--report", str(report))
    assert result.exit_code == 0, result.output
    assert sum(needle in line for line in result.stdout.splitlines()) == 1, result.stdout
    block = json.loads(report.read_text())["align_choice"]
    assert set(block) == BLOCK_KEYS and block["chosen"] == chosen and block["batch"] == 2 and block["threads"] == 1
    assert block["runtime"] == "onnxruntime" and block["masked_ms"] == medians[0]
    assert [(c["align"], c["median_ms"]) for c in block["candidates"]] == list(zip(ALIGN_CANDIDATES, medians[1:]))
    doc = json.loads(report.read_text())
    if chosen == "masked":  # the file and the summary both say nothing was removed
        assert out.read_bytes() == source.read_bytes()
        assert doc["params_after"] == doc["params_before"] and doc["layers"] == []
    else:
        assert doc["params_after"] < doc["params_before"] and doc["layers"]


def test_cli_optimize_compact_align_auto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _sparse_convnet(tmp_path / "dense.onnx")
    _fixed_medians(monkeypatch, [3.0, 1.0, 2.0, 2.0])
    out, report = tmp_path / "c.onnx", tmp_path / "r.json"
    result = _cli("optimize", str(source), "-o", str(out), "--method", "magnitude", "--sparsity", "0.6", "--compact",
                  "--align", "auto", "--report", str(report))
    assert result.exit_code == 0, result.output
    block = json.loads(report.read_text())["compact"]["align_choice"]
    assert block["chosen"] == 1 and set(block) == BLOCK_KEYS
    assert all(c["max_rel"] <= EXACT_REL for c in block["candidates"])
    assert _leftovers(tmp_path, source, out, report) == []  # the masked temporary is gone too


@pytest.mark.parametrize(("args", "needle"), [
    (["compact", "{src}", "-o", "{dir}/c.pt", "--align", "auto"], "--align auto"),
    (["compact", "{src}", "-o", "{dir}/c.onnx", "--align", "fast"], "--align"),
    (["compact", "{src}", "-o", "{dir}/c.onnx", "--align", "0"], "--align"),
    (["compact", "{src}", "-o", "{dir}/c.onnx", "--batch", "2"], "use -o FAST.pt"),
    (["compact", "{src}", "-o", "{dir}/c.onnx", "--align", "auto", "--device", "cuda"], "--device"),
    (["compact", "{src}", "-o", "{dir}/c.onnx", "--align", "auto", "--threads", "0"], "--threads"),
    (["optimize", "{src}", "-o", "{dir}/m.onnx", "--align", "auto"], "--compact"),
])
def test_usage_errors_name_the_flag(tmp_path: Path, args: list[str], needle: str) -> None:
    source = _sparse_convnet(tmp_path / "sparse.onnx")
    result = _cli(*(a.format(src=source, dir=tmp_path) for a in args))
    assert result.exit_code == 2 and needle in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert _leftovers(tmp_path, source) == []


def test_a_symbolic_dim_past_the_batch_is_a_one_line_error_naming_the_fix(tmp_path: Path) -> None:
    source = _sparse_convnet(tmp_path / "sparse.onnx", dims=("N", 3, "H", "W"))
    result = _cli("compact", str(source), "-o", str(tmp_path / "c.onnx"), "--align", "auto")
    assert result.exit_code == 1 and "--align auto" in result.stderr and "--align N" in result.stderr, result.output
    assert "H" in result.stderr and "--input-shape" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and _leftovers(tmp_path, source) == []
    bound = _cli("compact", str(source), "-o", str(tmp_path / "c.onnx"), "--align", "auto", "--input-shape", "1,3,16,16")
    assert bound.exit_code == 0 and (tmp_path / "c.onnx").exists(), bound.output


def test_parse_align() -> None:
    assert parse_align("auto") is None and parse_align("AUTO") is None and parse_align("4") == 4
    for bad in ("0", "-4", "four", "4.5", ""):
        with pytest.raises(UsageError, match="--align"):
            parse_align(bad)
