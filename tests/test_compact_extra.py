"""Compaction edge cases: shared weights, torch ``.pt`` compact modules, the onnx.checker policy.

* A Param used by several nodes (a tied weight, a conv applied twice, a bias shared by two
  layers, a weight read as W and Wᵀ) is a boundary for ``dead-node-elim``: never sliced,
  masked or folded into in place, so the compact model computes exactly what the sparse
  (masked) model computes — checked with onnxruntime on sparse models made by hand (zeros =
  pruned, as ``paic compact`` reads them) and on the SynFlow repro.
* ``--compact -o x.pt`` on a PyTorch model writes a CompactModule that loads in a fresh
  process (``torch.load(..., weights_only=False)``) and matches the masked torch model; the
  same for an ONNX input.
* ``--compact`` / ``paic compact`` follow the masked writer's onnx.checker policy: an input that
  already fails the checker gets a warning, a compact model that breaks it is an error.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pai_compiler.api import compact_graph, load_model, optimize, save_compact
from pai_compiler.audit import masks_from_zeros
from pai_compiler.backends.onnx_compact import write_compact_onnx
from pai_compiler.backends.onnx_masked import write_masked_onnx
from pai_compiler.errors import PaicError
from pai_compiler.interp import Interpreter
from pai_compiler.ort import session

N = helper.make_node


def _model(nodes: list[object], inits: dict[str, np.ndarray], x_shape: list[object], out_rank: int, *, out_shape: bool = True) -> onnx.ModelProto:
    dims = ["N"] + [f"d{i}" for i in range(out_rank - 1)] if out_shape else None
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = session(path, threads=1)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(ref).max())))


def _sparsify(inits: dict[str, np.ndarray], names: list[str], rng: np.random.Generator, mode: str) -> dict[str, np.ndarray]:
    """Zero whole output rows / input columns (dead channels, constant channels) or 90% of the entries."""
    out = dict(inits)
    for name in names:
        w = out[name].copy()
        if mode == "rows":
            w[rng.random(w.shape[0]) < 0.4] = 0
        elif mode == "cols":
            w[:, rng.random(w.shape[1]) < 0.4] = 0
        else:
            w[rng.random(w.shape) < 0.9] = 0
        out[name] = w
    return out


def _rand(*shape: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


# ---- shared weights -------------------------------------------------------------------------------
Case = tuple[list[object], dict[str, np.ndarray], list[str], list[object], int]


def _matmul_twice() -> Case:  # y = relu(x @ W) @ W (the tester's repro)
    return ([N("MatMul", ["x", "W"], ["h"]), N("Relu", ["h"], ["hr"]), N("MatMul", ["hr", "W"], ["y"])],
            {"W": _rand(16, 16, seed=1)}, ["W"], ["N", 16], 2)


def _gemm_twice_with_bias() -> Case:  # weight and bias both shared; constant channels from the bias
    return ([N("Gemm", ["x", "W", "b"], ["h"]), N("Relu", ["h"], ["hr"]), N("Gemm", ["hr", "W", "b"], ["y"])],
            {"W": _rand(16, 16, seed=2), "b": _rand(16, seed=3)}, ["W"], ["N", 16], 2)


def _reads_constants() -> Case:  # a shared weight whose input has constant (bias-only) channels
    nodes = [N("Gemm", ["x", "W1", "b1"], ["a"]), N("Relu", ["a"], ["ar"]), N("MatMul", ["ar", "W"], ["h"]),
             N("Relu", ["h"], ["hr"]), N("MatMul", ["hr", "W"], ["y"])]
    return nodes, {"W1": _rand(16, 16, seed=4), "b1": _rand(16, seed=5), "W": _rand(16, 16, seed=6)}, ["W1", "W"], ["N", 16], 2


def _transposed_use() -> Case:  # W (16, 24) read as W by one Gemm and as Wᵀ by the other (kept dense)
    nodes = [N("Gemm", ["x", "W", "b"], ["h"]), N("Relu", ["h"], ["hr"]), N("Gemm", ["hr", "W"], ["y"], transB=1)]
    return nodes, {"W": _rand(16, 24, seed=7), "b": _rand(24, seed=8)}, ["W"], ["N", 16], 2


def _square_transposed_use() -> Case:  # y = V(relu(relu(relu(x W1 + b1) W) Wᵀ + b2)): W and Wᵀ, same shape
    nodes = [N("Gemm", ["x", "W1", "b1"], ["a"]), N("Relu", ["a"], ["ar"]), N("MatMul", ["ar", "W"], ["h"]),
             N("Relu", ["h"], ["hr"]), N("Gemm", ["hr", "W", "b2"], ["z"], transB=1), N("Relu", ["z"], ["zr"]),
             N("Gemm", ["zr", "V"], ["y"])]
    w1 = _rand(16, 16, seed=9) * (np.random.default_rng(10).random((16, 16)) < 0.02)  # nearly all constant
    inits = {"W1": w1, "b1": _rand(16, seed=11), "W": _rand(16, 16, seed=12), "b2": _rand(16, seed=13), "V": _rand(16, 16, seed=14)}
    return nodes, inits, ["W1", "V"], ["N", 16], 2


def _conv_twice() -> Case:
    nodes = [N("Conv", ["x", "C", "cb"], ["h"], pads=[1, 1, 1, 1]), N("Relu", ["h"], ["hr"]),
             N("Conv", ["hr", "C"], ["y0"], pads=[1, 1, 1, 1]), N("GlobalAveragePool", ["y0"], ["y"])]
    return nodes, {"C": _rand(8, 8, 3, 3, seed=15), "cb": _rand(8, seed=16)}, ["C"], ["N", 8, 6, 6], 4


def _conv_shared_one_side_dies() -> Case:
    """C feeds a branch whose consumer prunes channels (they die) and a branch that keeps them."""
    nodes = [N("Conv", ["x", "C1", "b1"], ["a"], pads=[1, 1, 1, 1]), N("Relu", ["a"], ["ar"]),
             N("Conv", ["ar", "C", "cb"], ["h1"], pads=[1, 1, 1, 1]), N("Relu", ["h1"], ["h1r"]), N("Conv", ["h1r", "C4"], ["z1"]),
             N("Conv", ["h1r", "C", "cb"], ["h2"], pads=[1, 1, 1, 1]), N("Sigmoid", ["h2"], ["h2r"]), N("Conv", ["h2r", "C3"], ["z2"]),
             N("GlobalAveragePool", ["z1"], ["p1"]), N("GlobalAveragePool", ["z2"], ["p2"]), N("Concat", ["p1", "p2"], ["y"], axis=1)]
    inits = {"C1": _rand(8, 3, 3, 3, seed=17), "b1": _rand(8, seed=18), "C": _rand(8, 8, 3, 3, seed=19), "cb": _rand(8, seed=20),
             "C3": _rand(8, 8, 1, 1, seed=21), "C4": _rand(4, 8, 1, 1, seed=22)}
    return nodes, inits, ["C1", "C", "C3", "C4"], ["N", 3, 6, 6], 4


def _bias_only_shared() -> Case:
    """Two Gemms with their own weights share the bias; the first one's input has constant channels to fold."""
    nodes = [N("Gemm", ["x", "W1", "b1"], ["a"]), N("Relu", ["a"], ["ar"]), N("Gemm", ["ar", "W3", "bs"], ["y1"]),
             N("Gemm", ["x", "W4", "bs"], ["y2"]), N("Add", ["y1", "y2"], ["y"])]
    inits = {"W1": _rand(16, 16, seed=23), "b1": _rand(16, seed=24), "W3": _rand(16, 16, seed=25), "W4": _rand(16, 16, seed=26), "bs": _rand(16, seed=27)}
    return nodes, inits, ["W1", "W3", "W4"], ["N", 16], 2


SHARED: dict[str, Callable[[], Case]] = {
    "matmul_twice": _matmul_twice,
    "gemm_twice_with_bias": _gemm_twice_with_bias,
    "reads_constants": _reads_constants,
    "transposed_use": _transposed_use,
    "square_transposed_use": _square_transposed_use,
    "conv_twice": _conv_twice,
    "conv_shared_one_side_dies": _conv_shared_one_side_dies,
    "bias_only_shared": _bias_only_shared,
}


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_params_compact_exactly(tmp_path: Path, name: str) -> None:
    nodes, inits, prunable, x_shape, out_rank = SHARED[name]()
    for seed in range(3):
        rng = np.random.default_rng(seed)
        for mode in ("rows", "cols", "entries"):
            src, out = tmp_path / f"{mode}{seed}.onnx", tmp_path / f"{mode}{seed}_compact.onnx"
            onnx.save_model(_model(nodes, _sparsify(inits, prunable, rng, mode), x_shape, out_rank), str(src))
            graph = load_model(src)
            masks_from_zeros(graph)
            write_compact_onnx(graph, src, out, compact_graph(graph))
            x = rng.standard_normal([2 if d == "N" else d for d in x_shape]).astype(np.float32)
            _close(_run(out, x), _run(src, x))


def test_shared_weight_is_never_masked_or_folded_into(tmp_path: Path) -> None:
    """The repro: a tied W at SynFlow 95% stays W (byte for byte), with no folded bias added."""
    nodes, inits, _, x_shape, out_rank = _matmul_twice()
    src, masked, small = tmp_path / "m.onnx", tmp_path / "masked.onnx", tmp_path / "compact.onnx"
    onnx.save_model(_model(nodes, inits, x_shape, out_rank), str(src))
    result = optimize(src, sparsity=0.95, method="synflow")
    write_masked_onnx(result.graph, src, masked)
    graph = result.graph.clone()
    write_compact_onnx(graph, src, small, compact_graph(graph))
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    _close(_run(small, x), _run(masked, x))
    with torch.no_grad():
        ref = Interpreter(result.graph).run([torch.from_numpy(x)]).outputs[0].numpy()
        _close(Interpreter(graph).run([torch.from_numpy(x)]).outputs[0].numpy(), ref)
    w_masked = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(masked)).graph.initializer}
    w_small = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(small)).graph.initializer}
    assert set(w_small) == {"W"} and np.array_equal(w_small["W"], w_masked["W"])


# ---- torch .pt compact modules ----------------------------------------------------------------------
_MODEL_PY = '''
import torch, torch.nn as nn


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2)
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            self.c1.weight[:3] *= 1e-3  # magnitude prunes these: constant channels, folded
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.relu(self.c2(x))
        return self.fc(x.mean((2, 3)))
'''

_LOAD_AND_RUN = textwrap.dedent("""
    import sys, numpy as np, torch
    module = torch.load(sys.argv[1], weights_only=False)
    with torch.no_grad():
        np.save(sys.argv[3], module(torch.from_numpy(np.load(sys.argv[2]))).numpy())
""")


def _run_pt_in_fresh_process(pt: Path, x: np.ndarray, tmp: Path) -> np.ndarray:
    np.save(tmp / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, str(pt), str(tmp / "x.npy"), str(tmp / "y.npy")],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return np.load(tmp / "y.npy")


def _cli(*args: str) -> None:
    from typer.testing import CliRunner

    from pai_compiler.cli import app

    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output


def test_torch_model_compact_pt_loads_in_a_fresh_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pai_compiler.backends.torch_backend import load_pt

    (tmp_path / "models.py").write_text(_MODEL_PY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    common = ["models.py:CNN", "--input-shape", "2,3,16,16", "-s", "0.9", "-m", "magnitude", "-q"]
    _cli("optimize", *common, "-o", "masked.pt")
    _cli("optimize", *common, "-o", "compact.pt", "--compact", "--report", "r.json")
    import json

    compact = json.loads((tmp_path / "r.json").read_text())["compact"]
    assert compact["params_after"] < compact["params_before"] and compact["folds"]
    from models import CNN  # type: ignore[import-not-found]

    masked = load_pt(tmp_path / "masked.pt", CNN()).eval()
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)  # another batch size
    with torch.no_grad():
        ref = masked(torch.from_numpy(x)).numpy()
    _close(_run_pt_in_fresh_process(tmp_path / "compact.pt", x, tmp_path), ref)


def test_onnx_model_compact_pt_loads_in_a_fresh_process(tmp_path: Path) -> None:
    src = Path(__file__).resolve().parents[1] / "examples" / "models" / "vgg_small.onnx"
    masked = tmp_path / "masked.onnx"
    result = optimize(src, sparsity=0.99, method="magnitude")
    write_masked_onnx(result.graph, src, masked)
    save_compact(result.graph, src, tmp_path / "compact.pt", compact_graph(result.graph))
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    _close(_run_pt_in_fresh_process(tmp_path / "compact.pt", x, tmp_path), _run(masked, x))


# ---- onnx.checker policy -------------------------------------------------------------------------------
def _shapeless_output_model(path: Path) -> None:
    """A valid-to-run model that onnx.checker rejects: its graph output has a type but no shape."""
    inits = {"W": _rand(8, 6, seed=30), "b": _rand(6, seed=31), "V": _rand(6, 4, seed=32)}
    nodes = [N("Gemm", ["x", "W", "b"], ["h"]), N("Relu", ["h"], ["hr"]), N("MatMul", ["hr", "V"], ["y"])]
    model = _model(nodes, inits, ["N", 8], 2, out_shape=False)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))


def test_compact_of_an_input_failing_the_checker_warns(tmp_path: Path) -> None:
    src = tmp_path / "shapeless.onnx"
    _shapeless_output_model(src)
    masked, direct, later = tmp_path / "masked.onnx", tmp_path / "direct.onnx", tmp_path / "later.onnx"
    _cli("optimize", str(src), "-s", "0.5", "-m", "magnitude", "-o", str(masked), "-q")
    _cli("optimize", str(src), "-s", "0.5", "-m", "magnitude", "-o", str(direct), "-q", "--compact")
    _cli("compact", str(masked), "-o", str(later), "-q")
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    _close(_run(direct, x), _run(masked, x))
    _close(_run(later, x), _run(masked, x))
    graph = load_model(masked)  # the API records the warning
    masks_from_zeros(graph)
    write_compact_onnx(graph, masked, tmp_path / "api.onnx", compact_graph(graph))
    assert any("already fails onnx.checker" in w for w in graph.meta["warnings"])


def test_compact_model_breaking_the_checker_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = Path(__file__).resolve().parents[1] / "examples" / "models" / "vgg_small.onnx"
    real = onnx.checker.check_model

    def picky(model: object, *args: object, **kwargs: object) -> None:
        if str(model) != str(src):  # only the written model fails
            raise onnx.checker.ValidationError("simulated: broken compact model")
        real(model, *args, **kwargs)  # type: ignore[arg-type]

    result = optimize(src, sparsity=0.99, method="magnitude")
    report = compact_graph(result.graph)
    monkeypatch.setattr(onnx.checker, "check_model", picky)
    with pytest.raises(PaicError, match="fails onnx.checker: simulated"):
        write_compact_onnx(result.graph, src, tmp_path / "o.onnx", report)
    assert list(tmp_path.iterdir()) == []
