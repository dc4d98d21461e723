"""Compact ONNX with two symbolic dims in one Reshape target (GPT-2's ``Conv1D`` on [batch, seq, d]).

``x.view(-1, nx) @ W + b`` then ``.view(*x.shape[:-1], nf)``: once ``nf`` shrinks, the new target
[batch, seq, nf'] has two symbolic dims, which no constant shape (``0`` copies, one ``-1``)
states when the Reshape's input is the 2-d product. The writer keeps the exported shape tensor's
runtime entries and puts the new width in with a ``Where``. Checked against the source model in
onnxruntime at several (batch, seq), and the hidden width must really shrink.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from pai_compiler.cli import app

ort = pytest.importorskip("onnxruntime")

D, HIDDEN, KEPT = 8, 32, 5


class _Conv1dFFN(nn.Module):
    """Two GPT-2 style ``Conv1D`` layers; all but KEPT hidden units have zero input weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w1, self.b1 = nn.Parameter(torch.randn(D, HIDDEN)), nn.Parameter(torch.zeros(HIDDEN))
        self.w2, self.b2 = nn.Parameter(torch.randn(HIDDEN, D)), nn.Parameter(torch.randn(D))
        with torch.no_grad():
            self.w1[:, KEPT:] = 0.0  # dead hidden units: zero weights in, zero bias, ReLU(0) = 0 out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x.reshape(-1, D) @ self.w1 + self.b1).view(*x.shape[:-1], HIDDEN)
        return (torch.relu(h).reshape(-1, HIDDEN) @ self.w2 + self.b2).view(*x.shape[:-1], D)


def _export(path: Path, dynamo: bool, fold: bool) -> Path:
    x = torch.randn(2, 3, D)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=1, max=64)
            torch.onnx.export(_Conv1dFFN(), (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                              dynamic_shapes={"x": {0: batch, 1: seq}})
        else:
            torch.onnx.export(_Conv1dFFN(), (x,), str(path), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                              do_constant_folding=fold, dynamic_axes={"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}})
    return path


@pytest.mark.parametrize("dynamo,fold", [(False, True), (False, False), (True, True)], ids=["legacy-fold", "legacy-nofold", "dynamo"])
def test_two_symbolic_dims_in_a_reshape_compact_exactly(tmp_path: Path, dynamo: bool, fold: bool) -> None:
    source = _export(tmp_path / "ffn.onnx", dynamo, fold)
    out = tmp_path / "compact.onnx"
    result = CliRunner().invoke(app, ["compact", str(source), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out))
    widths = {int(d) for t in model.graph.initializer for d in t.dims}
    assert HIDDEN not in widths and KEPT in widths  # the hidden layer really shrank
    ref, got = ort.InferenceSession(str(source)), ort.InferenceSession(str(out))
    for batch, seq in [(1, 1), (2, 7), (3, 13)]:
        x = np.random.default_rng(batch).standard_normal((batch, seq, D)).astype(np.float32)
        want, have = ref.run(None, {"x": x})[0], got.run(None, {"x": x})[0]
        assert have.shape == (batch, seq, D)
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_torch_output_times_at_the_given_input_shape_and_runs_at_any(tmp_path: Path) -> None:
    """``-o X.pt`` on a [batch, seq] model: without ``--input-shape`` one usage line naming it; with it,
    a module timed at that shape that matches the source at other (batch, seq) too."""
    source = _export(tmp_path / "ffn.onnx", dynamo=False, fold=True)
    out = tmp_path / "fast.pt"
    refused = CliRunner().invoke(app, ["compact", str(source), "-o", str(out), "-q"])
    assert refused.exit_code == 2 and "--input-shape" in refused.stderr and "seq" in refused.stderr, refused.output
    assert len(refused.stderr.strip().splitlines()) == 1 and not out.exists()
    result = CliRunner().invoke(app, ["compact", str(source), "-o", str(out), "--input-shape", "2,7,8", "-q", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    module = torch.load(str(out), weights_only=False)
    ref = ort.InferenceSession(str(source))
    for batch, seq in [(1, 3), (3, 11)]:
        x = np.random.default_rng(seq).standard_normal((batch, seq, D)).astype(np.float32)
        with torch.no_grad():
            have = module(torch.from_numpy(x)).numpy()
        want = ref.run(None, {"x": x})[0]
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    auto = CliRunner().invoke(app, ["compact", str(source), "-o", str(tmp_path / "auto.onnx"), "--align", "auto", "--input-shape", "1,5,8", "-q"])
    assert auto.exit_code == 0, auto.output


@pytest.mark.parametrize("args,needle", [(["--input-shape", "1,5,8"], "torch output"), (["-o", "X.pt", "--input-shape", "2,5,8", "--batch", "3"], "contradicts"),
                                         (["-o", "X.pt", "--input-shape", "1,x"], "comma-separated")], ids=["onnx-output", "batch", "malformed"])
def test_input_shape_usage_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    source = _export(tmp_path / "ffn.onnx", dynamo=False, fold=True)
    out = ["-o", str(tmp_path / "c.onnx")] if "-o" not in args else []
    args = [str(tmp_path / a) if a.endswith(".pt") else a for a in args]
    result = CliRunner().invoke(app, ["compact", str(source), *out, *args])
    assert result.exit_code == 2 and needle in result.stderr, result.output


def test_optimize_compact_takes_the_timing_shape_of_an_onnx_model(tmp_path: Path) -> None:
    """``paic optimize X.onnx --compact -o Y.pt --input-shape 1,5,8``: the shape the kernels are timed at."""
    source = _export(tmp_path / "ffn.onnx", dynamo=False, fold=True)
    base = ["optimize", str(source), "-m", "magnitude", "-s", "0.5", "--compact", "-q"]
    refused = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "a.pt")])
    assert refused.exit_code == 2 and "--input-shape" in refused.stderr, refused.output
    result = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "a.pt"), "--input-shape", "1,5,8"])
    assert result.exit_code == 0, result.output
    x = np.ones((2, 3, D), dtype=np.float32)
    with torch.no_grad():
        assert torch.load(str(tmp_path / "a.pt"), weights_only=False)(torch.from_numpy(x)).shape == (2, 3, D)
    keyword = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "b.pt"), "--input-shape", "x=1,5,8"])
    assert keyword.exit_code == 2 and "one value" in keyword.stderr, keyword.output
    malformed = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "c.pt"), "--input-shape", "1,five"])
    assert malformed.exit_code == 2 and "comma-separated" in malformed.stderr and not (tmp_path / "c.pt").exists(), malformed.output
