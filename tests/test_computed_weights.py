"""Conv/linear weights an ONNX model computes from stored tensors are layers like stored ones.

A model pruned with ``torch.nn.utils.prune`` and exported by the legacy exporter without
constant folding reads ``Mul(Cast(weight_mask), weight_orig)`` as each layer's weight; weight
norm reads ``g * v / ||v||``. The reader folds these at compile time; the folded tensor is a
prunable Param (origin: the computed ONNX value), so:

* the audit of the unfolded export equals that of the folded export (plain initializers: the
  independent check), of the dynamo export and of the torch frontend;
* optimize writes each computed weight × mask as a new initializer its layers read, and
  onnxruntime on the written model equals the IR's masked forward (and the input's output for
  the masks the zeros already give); compact (.onnx and .pt) computes what the input computes;
* ties (a computed weight read by two layers), Transpose/Identity/Reshape of a product work.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.nn.utils.prune as torch_prune
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from pai_compiler.api import compact_graph, optimize, save_compact, save_model
from pai_compiler.audit import audit_graph, masks_from_zeros
from pai_compiler.backends.onnx_masked import write_masked_onnx
from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.frontends.torch.spec import lower_module
from pai_compiler.interp import Interpreter
from pai_compiler.ort import session

X = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)


def _pruned_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    for layer in (model[0], model[2], model[5]):
        torch_prune.l1_unstructured(layer, "weight", amount=0.9)
    return model


def _export(model: nn.Module, example: torch.Tensor, path: Path, **options: Any) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), **options)
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("computed")
    model, x = _pruned_model(), torch.from_numpy(X)
    return {f"fold{int(fold)}": _export(model, x, folder / f"fold{int(fold)}.onnx", dynamo=False, do_constant_folding=fold, opset_version=17)
            for fold in (False, True)}


def _ort(path: Path, *inputs: np.ndarray) -> np.ndarray:
    s = session(str(path))
    return s.run(None, {i.name: x for i, x in zip(s.get_inputs(), inputs)})[0]


def _ir(graph: Any, *inputs: np.ndarray) -> np.ndarray:
    return Interpreter(graph).run([torch.from_numpy(x) for x in inputs]).outputs[0].numpy()


def _close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))


def _totals(graph: Any) -> dict[str, Any]:
    totals = audit_graph(graph)["totals"]
    return {k: (round(v, 9) if isinstance(v, float) else v) for k, v in totals.items()}


def test_unfolded_export_audits_like_the_folded_one_and_the_torch_model(exports: dict[str, Path]) -> None:
    unfolded = load_onnx_model(exports["fold0"])
    assert [p.name for p in unfolded.prunable_params()] == ["0.weight_orig", "2.weight_orig", "5.weight_orig"]
    assert {unfolded.meta["weight_sources"][p.origin] for p in unfolded.prunable_params()} == {"computed"}
    expected = _totals(load_onnx_model(exports["fold1"]))
    assert expected["macs_nonzero"] < expected["macs_dense"] and expected["effective_params"] > 0
    assert _totals(unfolded) == expected
    assert _totals(lower_module(_pruned_model(), torch.from_numpy(X))) == expected


def test_dynamo_export_audits_alike(exports: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    path = _export(_pruned_model(), torch.from_numpy(X), tmp_path / "dynamo.onnx", dynamo=True)
    assert _totals(load_onnx_model(path)) == _totals(load_onnx_model(exports["fold0"]))


def test_optimize_writes_computed_weights_times_masks(exports: dict[str, Path], tmp_path: Path) -> None:
    results = {name: optimize(str(path), sparsity=0.95, method="magnitude") for name, path in exports.items()}
    masks = [[p.mask for p in r.graph.prunable_params()] for r in results.values()]
    assert all(np.array_equal(a, b) for a, b in zip(*masks))  # the same weights, the same masks
    out = tmp_path / "pruned.onnx"
    save_model(results["fold0"], exports["fold0"], out)
    _close(_ort(out, X), _ir(results["fold0"].graph, X))
    save_model(results["fold1"], exports["fold1"], tmp_path / "folded.onnx")
    np.testing.assert_array_equal(_ort(out, X), _ort(tmp_path / "folded.onnx", X))
    assert _totals(load_onnx_model(out)) == _totals(load_onnx_model(tmp_path / "folded.onnx"))


def test_masks_of_the_zeros_write_the_input_function(exports: dict[str, Path], tmp_path: Path) -> None:
    graph = load_onnx_model(exports["fold0"])
    masks_from_zeros(graph)
    out = tmp_path / "same.onnx"
    write_masked_onnx(graph, exports["fold0"], out)
    np.testing.assert_array_equal(_ort(out, X), _ort(exports["fold0"], X))
    _close(_ir(graph, X), _ort(exports["fold1"], X))
    written = onnx.load(str(out)).graph  # the layers read the new masked initializers, not the Mul(mask, weight_orig)
    inits = {t.name for t in written.initializer}
    weights = [n.input[1] for n in written.node if n.op_type in ("Conv", "Gemm")]
    assert weights and all(w in inits and w.endswith("_masked") for w in weights)


@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_compact_of_the_unfolded_export(exports: dict[str, Path], tmp_path: Path, suffix: str) -> None:
    graph = load_onnx_model(exports["fold0"])
    masks_from_zeros(graph)
    out = tmp_path / f"small{suffix}"
    save_compact(graph, exports["fold0"], out, compact_graph(graph))
    expected = _ort(exports["fold0"], X)
    if suffix == ".pt":
        module = torch.load(out, weights_only=False)
        with torch.no_grad():
            _close(module(torch.from_numpy(X)).numpy(), expected)
        return
    _close(_ort(out, X), expected)
    written = onnx.load(str(out)).graph
    assert not {"Mul", "Cast"} & {n.op_type for n in written.node}  # the computation is gone
    assert {t.name for t in written.initializer} >= {"0.weight_orig_compact", "5.weight_orig_compact"}


class _WeightNormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv1d(3, 8, 3, padding=1)
        self.normed = nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 8, 5, padding=2, groups=2), dim=2)
        self.head = nn.Linear(8 * 12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.normed(torch.relu(self.first(x)))).flatten(1))


def test_weight_norm_weight_is_a_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _WeightNormed().eval()
    with torch.no_grad():  # zeros in v are zeros of the computed weight
        model.normed.parametrizations.weight.original1[::2] = 0  # (norms over dims 0, 1 stay > 0)
    x = torch.randn(1, 3, 12)
    paths = {fold: _export(model, x, tmp_path / f"wn{int(fold)}.onnx", dynamo=False, do_constant_folding=fold, opset_version=17)
             for fold in (False, True)}
    graph = load_onnx_model(paths[False])
    normed = [p for p in graph.prunable_params() if graph.meta["weight_sources"][p.origin] == "computed"]
    assert [p.name for p in normed] == ["normed.parametrizations.weight.original1"]
    assert _totals(graph) == _totals(load_onnx_model(paths[True]))
    result = optimize(str(paths[False]), sparsity=0.8, method="magnitude")
    save_model(result, paths[False], tmp_path / "pruned.onnx")
    _close(_ort(tmp_path / "pruned.onnx", x.numpy()), _ir(result.graph, x.numpy()))


def _shared_model() -> onnx.ModelProto:
    """Wt = Identity(Transpose(Mul(Cast(mask), w))) read by two MatMuls (a tie); W2 = Reshape(a * b)."""
    rng = np.random.default_rng(1)
    inits = {"w": rng.standard_normal((6, 4)).astype(np.float32), "mask": (rng.random((6, 4)) > 0.5).astype(np.int64),
             "a": rng.standard_normal(18).astype(np.float32), "b": rng.standard_normal(18).astype(np.float32),
             "shape": np.array([6, 3], dtype=np.int64)}
    nodes = [helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT), helper.make_node("Mul", ["maskf", "w"], ["wm"]),
             helper.make_node("Transpose", ["wm"], ["wt0"], perm=[1, 0]), helper.make_node("Identity", ["wt0"], ["wt"]),
             helper.make_node("MatMul", ["x", "wt"], ["h1"]), helper.make_node("Relu", ["x"], ["rx"]),
             helper.make_node("MatMul", ["rx", "wt"], ["h2"]), helper.make_node("Add", ["h1", "h2"], ["h"]),
             helper.make_node("Relu", ["h"], ["hr"]), helper.make_node("Mul", ["a", "b"], ["ab"]),
             helper.make_node("Reshape", ["ab", "shape"], ["w2"]), helper.make_node("MatMul", ["hr", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_tied_transposed_and_reshaped_products(tmp_path: Path) -> None:
    path = tmp_path / "shared.onnx"
    onnx.save(_shared_model(), str(path))
    graph = load_onnx_model(path)
    params = {p.name: p for p in graph.prunable_params()}
    assert sorted(params) == ["a", "w"]  # named after the stored weight, not the 0/1 mask
    assert len(graph.param_users(params["w"])) == 2 and params["w"].origin == "wt"  # one Param: a tie
    x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    _close(_ir(graph, x), _ort(path, x))
    result = optimize(str(path), sparsity=0.6, method="magnitude")
    assert all(p.mask is not None and not p.mask.all() for p in result.graph.prunable_params())
    save_model(result, path, tmp_path / "pruned.onnx")
    _close(_ort(tmp_path / "pruned.onnx", x), _ir(result.graph, x))
    written = onnx.load(str(tmp_path / "pruned.onnx")).graph
    assert [list(n.input)[1] for n in written.node if n.op_type == "MatMul"] == ["w_masked", "w_masked", "a_masked"]
