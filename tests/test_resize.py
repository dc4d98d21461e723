"""Resize / Upsample / interpolate (nearest, linear): real semantics vs onnxruntime and torch,
paths vs brute force, torch route vs ONNX route, compaction, and the one-line refusals."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from pai_compiler.api import compact_graph, load_model, save_compact
from pai_compiler.audit import audit_graph, masks_from_zeros
from pai_compiler.frontends.onnx import load_onnx_model
from pai_compiler.frontends.torch.spec import lower_module
from pai_compiler.interp import Interpreter
from pai_compiler.ir import OpKind

CTMS = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "half_pixel_symmetric")
NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _resize_model(path: Path, in_shape: list[int], *, scales: list[float] | None = None, sizes: list[int] | None = None,
                  opset: int = 19, op_type: str = "Resize", **attrs: object) -> Path:
    """X -> Resize -> Y, with the scales or sizes as initializers."""
    inits, names = [], ["X"]
    if op_type == "Upsample":
        inits.append(numpy_helper.from_array(np.asarray(scales, dtype=np.float32), "scales"))
        names.append("scales")
    elif opset < 11:
        inits.append(numpy_helper.from_array(np.asarray(scales, dtype=np.float32), "scales"))
        names.append("scales")
    else:
        names += ["", "scales" if scales is not None else ""]
        if scales is not None:
            inits.append(numpy_helper.from_array(np.asarray(scales, dtype=np.float32), "scales"))
        else:
            inits.append(numpy_helper.from_array(np.asarray(sizes, dtype=np.int64), "sizes"))
            names.append("sizes")
    node = helper.make_node(op_type, names, ["Y"], name="resize0", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _ours_vs_ort(path: Path, x: np.ndarray) -> float:
    g = load_onnx_model(path)
    (node,) = [n for n in g.nodes if n.kind is OpKind.OPAQUE]
    assert node.attrs["op"] == "resize", node.attrs
    ours = Interpreter(g).run([torch.from_numpy(x)]).outputs[0].numpy()
    (ref,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"X": x})
    assert ours.shape == ref.shape and tuple(g.outputs[0].shape if hasattr(g, "outputs") else ours.shape) is not None
    return float(np.abs(ours - ref).max())


@pytest.mark.parametrize("rank", [3, 4, 5])
def test_every_mode_matches_onnxruntime(tmp_path: Path, rank: int) -> None:
    rng = np.random.default_rng(rank)
    spatial = {3: [7], 4: [5, 6], 5: [3, 4, 5]}[rank]
    x = rng.standard_normal((1, 2, *spatial)).astype(np.float32)
    resizes = [({"scales": [1, 1] + [2.0] * (rank - 2)}), ({"scales": [1, 1] + [0.5] * (rank - 2)}),
               ({"scales": [1, 1] + [1.5, 0.75, 3.0][: rank - 2]}), ({"sizes": [1, 2] + [4, 9, 2][: rank - 2]})]
    worst = 0.0
    for i, (how, ctm) in enumerate(itertools.product(resizes, CTMS)):
        for mode, nearest in [("linear", "round_prefer_floor"), *(("nearest", m) for m in NEAREST)]:
            path = _resize_model(tmp_path / f"r{i}_{mode}_{nearest}.onnx", [1, 2, *spatial], mode=mode,
                                 coordinate_transformation_mode=ctm, nearest_mode=nearest, **how)  # type: ignore[arg-type]
            err = _ours_vs_ort(path, x)
            assert err <= 1e-6, (how, ctm, mode, nearest, err)
            worst = max(worst, err)


def _only_resize(g: object) -> None:
    resizes = [n for n in g.nodes if n.kind is OpKind.OPAQUE]  # type: ignore[attr-defined]
    assert resizes and all(n.attrs.get("op") == "resize" for n in resizes), [n.attrs for n in resizes]


class _Interp(nn.Module):
    def __init__(self, **options: object) -> None:
        super().__init__()
        self.options = options

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, **self.options)  # type: ignore[arg-type]


TORCH_CASES = [
    {"scale_factor": 2, "mode": "nearest"}, {"scale_factor": 0.5, "mode": "nearest"}, {"size": (7, 3), "mode": "nearest"},
    {"scale_factor": 1.7, "mode": "nearest"}, {"scale_factor": 1.7, "mode": "nearest", "recompute_scale_factor": True},
    {"scale_factor": 2, "mode": "bilinear"}, {"scale_factor": 0.6, "mode": "bilinear"}, {"size": (9, 4), "mode": "bilinear"},
    {"scale_factor": 3, "mode": "bilinear", "align_corners": True}, {"size": (1, 4), "mode": "bilinear", "align_corners": True},
]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_torch_route_matches_interpolate(frontend: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6)
    for options in TORCH_CASES:
        g = lower_module(_Interp(**options), (x,), frontend)
        _only_resize(g)
        ours = Interpreter(g, bind={"N": 2}).run([x]).outputs[0]
        assert torch.allclose(ours, F.interpolate(x, **options), atol=1e-6, rtol=0), options  # type: ignore[arg-type]
    for mode, size in (("linear", 11), ("nearest", 4)):
        x1 = torch.randn(1, 2, 7)
        g = lower_module(_Interp(size=size, mode=mode), (x1,), frontend)
        assert torch.allclose(Interpreter(g).run([x1]).outputs[0], F.interpolate(x1, size=size, mode=mode), atol=1e-6)
    x3 = torch.randn(1, 2, 3, 4, 5)
    g = lower_module(_Interp(scale_factor=2, mode="trilinear"), (x3,), frontend)
    assert torch.allclose(Interpreter(g).run([x3]).outputs[0], F.interpolate(x3, scale_factor=2, mode="trilinear"), atol=1e-6)


class _UpCNN(nn.Module):
    """conv -> resize -> relu -> conv: the resize sits between two prunable layers."""

    def __init__(self, **options: object) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
        self.options = options

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(F.interpolate(self.c1(x), **self.options)))  # type: ignore[arg-type]


UP_CASES = {"nearest": {"scale_factor": 2, "mode": "nearest"}, "bilinear": {"scale_factor": 2, "mode": "bilinear"},
            "sizes": {"size": (9, 7), "mode": "bilinear"}}


def _export(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, dynamo=False)
    return path


@pytest.mark.parametrize("case", sorted(UP_CASES))
def test_torch_and_onnx_routes_agree(tmp_path: Path, case: str) -> None:
    model, x = _UpCNN(**UP_CASES[case]).eval(), torch.randn(1, 3, 5, 6)
    source = _export(model, x, tmp_path / "m.onnx")
    graphs = [lower_module(model, (x,), "fx"), lower_module(model, (x,), "export"), load_onnx_model(source)]
    for g in graphs:
        _only_resize(g)
        assert torch.allclose(Interpreter(g, bind={"N": 2}).run([x.repeat(2, 1, 1, 1)]).outputs[0][:1], model(x), atol=1e-5)
    totals = [audit_graph(g)["totals"] for g in graphs]
    assert all(t["log_paths"] is not None for t in totals)
    assert max(abs(t["log_paths"] - totals[0]["log_paths"]) for t in totals) < 1e-9, [t["log_paths"] for t in totals]


def _sizes_cnn(path: Path) -> Path:
    """Conv(3->8) -> Resize by constant sizes [1, 8, 9, 7] -> Relu -> Conv(8->4): the sizes name the channel count."""
    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    w2 = rng.standard_normal((4, 8, 3, 3)).astype(np.float32)
    w1[[1, 4, 6]] = 0  # constant (bias-only) channels: folded into c2
    w2[:, [2, 5]] = 0  # channels no one reads: dead
    inits = [numpy_helper.from_array(a, k) for k, a in {"w1": w1, "b1": b1, "w2": w2, "sizes": np.array([1, 8, 9, 7], dtype=np.int64)}.items()]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["a", "", "", "sizes"], ["r"], mode="linear"), helper.make_node("Relu", ["r"], ["h"]),
             helper.make_node("Conv", ["h", "w2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 9, 7])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _pruned_export(tmp_path: Path, case: str) -> Path:
    model = _UpCNN(**UP_CASES[case]).eval()
    with torch.no_grad():
        model.c1.weight[[0, 3]] = 0  # constant channels
        model.c2.weight[:, [1, 5, 7]] = 0  # dead channels
    return _export(model, torch.randn(1, 3, 5, 6), tmp_path / f"{case}.onnx")


@pytest.mark.parametrize("case", ["nearest", "bilinear", "sizes", "constant_sizes"])
def test_compaction_is_exact(tmp_path: Path, case: str) -> None:
    src = _sizes_cnn(tmp_path / "c.onnx") if case == "constant_sizes" else _pruned_export(tmp_path, case)
    x = np.random.default_rng(1).standard_normal((1, 3, 5, 6)).astype(np.float32)
    (ref,) = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for out in (tmp_path / "compact.onnx", tmp_path / "compact.pt"):
        graph = load_model(src)
        masks_from_zeros(graph)
        report = compact_graph(graph)
        assert report.removed_atoms == 5, report  # 2-3 constant channels folded, 2-3 dead ones
        save_compact(graph, src, out, report)
        if out.suffix == ".onnx":
            (got,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        else:
            with torch.no_grad():
                got = torch.load(out, weights_only=False)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
