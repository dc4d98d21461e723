"""``paic bench``: latency rows, speed-up against the first model, output agreement, errors and exit codes.

Timings themselves are never asserted (the machine is shared); the schema, the baseline's
speed-up of 1, agreement of equal models and disagreement of different ones are.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from pai_compiler import api
from pai_compiler.backends.sparse_select import build_sparse_module
from pai_compiler.bench import AGREE_REL, bench_models
from pai_compiler.cli import app
from pai_compiler.errors import ModelError, UsageError
from pai_compiler.io import save_torch_atomic

ROW_KEYS = {"model", "runtime", "median_ms", "speedup", "max_abs", "max_rel", "agrees"}


def _mlp(path: Path, seed: int, dims: list[object]) -> Path:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((8, 6)) * (rng.random((8, 6)) < 0.5)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w.T.copy(), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str


def _paic(*args: str, cwd: Path) -> Run:
    """The CLI in-process (a subprocess per case would cost seconds of imports)."""
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    finally:
        os.chdir(previous)
    return Run(result.exit_code, result.stdout, result.stderr)


@pytest.fixture()
def models(tmp_path: Path) -> Path:
    """masked.onnx, the same model as a sparse-execution fast.pt, and a different model other.onnx."""
    _mlp(tmp_path / "masked.onnx", seed=0, dims=["N", 6])
    _mlp(tmp_path / "other.onnx", seed=1, dims=["N", 6])
    graph = api.load_model(tmp_path / "masked.onnx")
    module, _ = build_sparse_module(graph, repeats=1, warmup=0, policy="sparse")
    save_torch_atomic(tmp_path / "fast.pt", module)
    return tmp_path


def test_bench_json_rows_speedup_and_agreement(models: Path) -> None:
    run = _paic("bench", "masked.onnx", "fast.pt", "other.onnx", "--batch", "3", "--repeats", "2", "--warmup", "1", "--json", cwd=models)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)  # JSON only on stdout
    assert doc["batch"] == 3 and doc["threads"] == 1 and doc["repeats"] == 2 and doc["agree_rel"] == AGREE_REL
    rows = doc["models"]
    assert [r["model"] for r in rows] == ["masked.onnx", "fast.pt", "other.onnx"] and all(set(r) == ROW_KEYS for r in rows)
    assert [r["runtime"] for r in rows] == ["onnxruntime", "torch", "onnxruntime"]
    assert rows[0]["speedup"] == 1.0 and rows[0]["max_abs"] == 0.0 and rows[0]["agrees"]
    assert rows[1]["agrees"] and rows[1]["max_rel"] <= 1e-5
    assert not rows[2]["agrees"] and rows[2]["max_rel"] > AGREE_REL
    assert all(r["median_ms"] > 0 for r in rows)


def test_bench_table(models: Path) -> None:
    run = _paic("bench", "masked.onnx", "fast.pt", "--repeats", "1", "--warmup", "0", cwd=models)
    assert run.returncode == 0, run.stderr
    assert "paic bench" in run.stdout and "speed-up" in run.stdout and "fast.pt" in run.stdout


def test_bench_symbolic_dims_need_input_shape(tmp_path: Path) -> None:
    _mlp(tmp_path / "seq.onnx", seed=0, dims=["N", "seq", 6])
    run = _paic("bench", "seq.onnx", cwd=tmp_path)
    assert run.returncode == 1 and "--input-shape" in run.stderr and "seq" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    result = bench_models([str(tmp_path / "seq.onnx")], input_shape="2,5,6", repeats=1, warmup=0)
    assert result.batch == 2 and result.rows[0].agrees


def test_bench_shape_mismatch_disagrees(tmp_path: Path) -> None:
    _mlp(tmp_path / "a.onnx", seed=0, dims=["N", 6])
    result = bench_models([str(tmp_path / "a.onnx"), str(tmp_path / "a.onnx")], batch=2, repeats=1, warmup=0)
    assert all(row.agrees and row.max_abs == 0.0 for row in result.rows)


@pytest.mark.parametrize("args,needle", [
    (("nope.onnx",), "no such file"),
    (("masked.onnx", "notes.txt"), "unknown format"),
    (("masked.onnx", "--threads", "0"), "--threads"),
    (("masked.onnx", "--batch", "2", "--input-shape", "3,6"), "contradicts"),
    (("masked.onnx", "--input-shape", "3,a"), "--input-shape"),
])
def test_bench_usage_errors_exit_2(models: Path, args: tuple[str, ...], needle: str) -> None:
    (models / "notes.txt").write_text("not a model")
    run = _paic("bench", *args, cwd=models)
    assert run.returncode == 2 and needle in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_bench_model_errors_exit_1(models: Path) -> None:
    torch.save({"state_dict": {}}, models / "dict.pt")
    (models / "broken.onnx").write_bytes(b"not onnx")
    for name, needle in (("dict.pt", "not a torch module"), ("broken.onnx", "cannot load")):
        run = _paic("bench", name, cwd=models)
        assert run.returncode == 1 and needle in run.stderr, run.stderr
    with pytest.raises(ModelError, match="input shape unknown"):
        torch.save(torch.nn.Linear(6, 8), models / "plain.pt")
        bench_models([str(models / "plain.pt")], repeats=1, warmup=0)
    with pytest.raises(UsageError):
        bench_models([])


class _MaskedMean(torch.nn.Module):
    """Embedding rows averaged over the unmasked positions: a fully masked input gives the bias alone."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(5, 8), torch.nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0))



def _text_model(net: torch.nn.Module, path: Path) -> str:
    import warnings

    ids, mask = torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (ids, mask), str(path), dynamo=False, opset_version=17, input_names=["input_ids", "attention_mask"])
    return str(path)


def test_bench_feeds_an_open_mask_and_valid_indices(tmp_path: Path) -> None:
    """Integer inputs get what --data random feeds: an all-ones attention mask and indices below the
    table size (5 rows here: onnxruntime refuses an index out of range). Before, both were zeros: the
    mask hid every token, so two models with different embeddings 'agreed' (each output was the bias)."""
    torch.manual_seed(0)
    first = _MaskedMean().eval()
    torch.manual_seed(1)
    second = _MaskedMean().eval()
    second.head.load_state_dict(first.head.state_dict())  # the models differ only in their embedding tables
    paths = [_text_model(first, tmp_path / "a.onnx"), _text_model(second, tmp_path / "b.onnx")]
    result = bench_models(paths, repeats=1, warmup=0)
    assert result.rows[0].agrees and result.rows[0].max_abs == 0.0
    assert not result.rows[1].agrees and result.rows[1].max_rel is not None and result.rows[1].max_rel > 0.01
