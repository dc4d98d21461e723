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

from pai_compiler.api import compact_graph, load_model, optimize, save_compact
from pai_compiler.audit import audit_graph, masks_from_zeros
from pai_compiler.errors import PaicError
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
        names += ["roi" if opset < 13 else "", "scales" if scales is not None or opset < 13 else ""]
        if opset < 13:  # roi and scales are required inputs there (empty when unused)
            inits.append(numpy_helper.from_array(np.zeros(0, dtype=np.float32), "roi"))
        if scales is None and opset < 13:
            inits.append(numpy_helper.from_array(np.zeros(0, dtype=np.float32), "scales"))
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

    def __init__(self, module: bool = False, **options: object) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
        self.options = options
        self.up = nn.Upsample(**options) if module else None  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(x)
        return self.c2(torch.relu(self.up(h) if self.up is not None else F.interpolate(h, **self.options)))  # type: ignore[arg-type]


UP_CASES = {"nearest": {"scale_factor": 2, "mode": "nearest"}, "bilinear": {"scale_factor": 2, "mode": "bilinear"},
            "sizes": {"size": (9, 7), "mode": "bilinear"}}


def _export(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, dynamo=False)
    return path


@pytest.mark.parametrize("module", [True, False])
@pytest.mark.parametrize("case", sorted(UP_CASES))
def test_torch_and_onnx_routes_agree(tmp_path: Path, case: str, module: bool) -> None:
    """nn.Upsample / F.interpolate: torch.fx, torch.export and the ONNX export count the same paths."""
    model, x = _UpCNN(module, **UP_CASES[case]).eval(), torch.randn(1, 3, 5, 6)
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


def _conv_resize_conv(path: Path, resize: dict[str, object], spatial: list[int]) -> tuple[Path, np.ndarray, np.ndarray]:
    """x (1, 2, *spatial) -> 1x1 Conv(2->3, sparse) -> Resize -> 1x1 Conv(3->2, sparse) -> y."""
    rng = np.random.default_rng(len(spatial))
    k = [1] * len(spatial)
    w1 = (rng.random((3, 2, *k)) < 0.6).astype(np.float32) * rng.standard_normal((3, 2, *k)).astype(np.float32)
    w2 = (rng.random((2, 3, *k)) < 0.6).astype(np.float32) * rng.standard_normal((2, 3, *k)).astype(np.float32)
    inits = {"w1": w1, "w2": w2, **{key: np.asarray(v, dtype=np.int64 if key == "sizes" else np.float32) for key, v in resize.items() if key in ("scales", "sizes")}}
    ins = ["a", "", "scales" if "scales" in resize else "", "sizes" if "sizes" in resize else ""]
    attrs = {key: v for key, v in resize.items() if key not in ("scales", "sizes")}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("Resize", ins, ["r"], **attrs), helper.make_node("Conv", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, *spatial])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(v, key) for key, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path, w1.reshape(3, 2) != 0, w2.reshape(2, 3) != 0


def _resize_reads(path: Path, shape: tuple[int, ...]) -> dict[tuple[int, ...], list[tuple[int, ...]]]:
    """Brute force, by onnxruntime: for each input element of the Resize alone, the output elements a one-hot there changes."""
    model = onnx.load(str(path))
    resize = next(n for n in model.graph.node if n.op_type == "Resize")
    resize.input[0], resize.output[0] = "x", "y"
    graph = helper.make_graph([resize], "r", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(model.graph.initializer))
    single = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    single.ir_version = 8
    sess = ort.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"])
    reads: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for idx in itertools.product(*map(range, shape)):
        one_hot = np.zeros(shape, dtype=np.float32)
        one_hot[idx] = 1.0
        reads[idx] = [tuple(int(i) for i in o) for o in np.argwhere(sess.run(None, {"x": one_hot})[0] != 0)]
    return reads


def _brute_force_paths(path: Path, w1: np.ndarray, w2: np.ndarray, spatial: list[int]) -> int:
    """Every x -> y path of the unrolled graph, enumerated element by element (1x1 convs: kept weights only)."""
    reads = _resize_reads(path, (1, 3, *spatial))
    count = 0
    for _c, o1 in itertools.product(range(2), range(3)):
        if not w1[o1, _c]:
            continue
        for pixel in itertools.product(*map(range, spatial)):
            for out in reads[(0, o1, *pixel)]:
                count += sum(int(w2[o2, out[1]]) for o2 in range(2))
    return count


PATH_CASES = [
    ({"scales": [1, 1, 2, 2], "mode": "nearest"}, [3, 4]), ({"scales": [1, 1, 2.5, 1.5], "mode": "linear"}, [3, 4]),
    ({"sizes": [1, 3, 2, 3], "mode": "linear", "coordinate_transformation_mode": "align_corners"}, [3, 4]),
    ({"scales": [1, 1, 0.5, 0.75], "mode": "linear", "coordinate_transformation_mode": "half_pixel"}, [4, 4]),
    ({"sizes": [1, 3, 5, 3], "mode": "nearest", "nearest_mode": "round_prefer_ceil"}, [3, 4]),
    ({"scales": [1, 1, 3], "mode": "linear", "coordinate_transformation_mode": "asymmetric"}, [4]),
    ({"scales": [1, 1, 2, 1, 2], "mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, [2, 2, 3]),
]


@pytest.mark.parametrize("resize,spatial", PATH_CASES)
def test_paths_equal_brute_force(tmp_path: Path, resize: dict[str, object], spatial: list[int]) -> None:
    source, w1, w2 = _conv_resize_conv(tmp_path / "p.onnx", resize, spatial)
    count = _brute_force_paths(source, w1, w2, spatial)
    assert count > 0
    assert audit_graph(load_onnx_model(source))["totals"]["log_paths"] == pytest.approx(np.log(count), abs=1e-9)


LEGACY = [
    ("Resize", 10, {"scales": [1, 1, 0.6, 0.5], "mode": "nearest"}), ("Resize", 10, {"scales": [1, 1, 1.5, 2], "mode": "linear"}),
    ("Resize", 11, {"scales": [1, 1, 0.6, 1.7], "mode": "linear"}), ("Resize", 13, {"sizes": [1, 2, 3, 11], "mode": "nearest"}),
    ("Resize", 18, {"sizes": [8, 3], "axes": [3, 2], "mode": "linear"}), ("Resize", 18, {"scales": [2.0], "axes": [-1], "mode": "nearest"}),
    ("Upsample", 9, {"scales": [1, 1, 2, 3], "mode": "nearest"}), ("Upsample", 9, {"scales": [1, 1, 2, 1.5], "mode": "linear"}),
]


@pytest.mark.parametrize("op_type,opset,how", LEGACY)
def test_older_opsets_and_axes_match_onnxruntime(tmp_path: Path, op_type: str, opset: int, how: dict[str, object]) -> None:
    x = np.random.default_rng(opset).standard_normal((1, 2, 5, 6)).astype(np.float32)
    path = _resize_model(tmp_path / "m.onnx", [1, 2, 5, 6], opset=opset, op_type=op_type, **how)  # type: ignore[arg-type]
    assert _ours_vs_ort(path, x) <= 1e-6


def test_upsample_7_scales_attribute(tmp_path: Path) -> None:
    node = helper.make_node("Upsample", ["X"], ["Y"], name="up", scales=[1.0, 1.0, 2.0, 2.0], mode="linear")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 2, 3, 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "u.onnx"))
    assert _ours_vs_ort(tmp_path / "u.onnx", np.random.default_rng(0).standard_normal((1, 2, 3, 4)).astype(np.float32)) <= 1e-6


@pytest.mark.parametrize("attrs", [{"mode": "cubic"}, {"mode": "linear", "antialias": 1},
                                   {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize"}])
def test_unsupported_resize_refuses_in_one_line(tmp_path: Path, attrs: dict[str, object]) -> None:
    path = _resize_model(tmp_path / "m.onnx", [1, 2, 5, 6], scales=[1, 1, 2, 2], **attrs)  # type: ignore[arg-type]
    g = load_onnx_model(path)
    assert audit_graph(g)["totals"]["log_paths"] is None
    with pytest.raises(PaicError) as exc:
        Interpreter(g).run([torch.zeros(1, 2, 5, 6)])
    message = str(exc.value)
    assert "\n" not in message and "resize0" in message and "mode='nearest' or 'bilinear'" in message and "magnitude" in message, message


def test_unsupported_torch_interpolate_refuses_in_one_line() -> None:
    x = torch.randn(1, 2, 5, 6)
    for options in ({"scale_factor": 2, "mode": "bicubic"}, {"scale_factor": 0.5, "mode": "bilinear", "antialias": True}):
        g = lower_module(_Interp(**options), (x,), "fx")
        with pytest.raises(PaicError) as exc:
            Interpreter(g).run([x])
        assert "\n" not in str(exc.value) and "interpolate" in str(exc.value) and "mode='nearest' or 'bilinear'" in str(exc.value)


@pytest.mark.parametrize("case", ["nearest", "bilinear"])
def test_path_and_data_criteria_run_through_a_resize(tmp_path: Path, case: str) -> None:
    """Before: snip/grasp/synflow/dpai/npb refused the opaque node. DPaI's channel program runs it per pixel (its path rule)."""
    model = _UpCNN(**UP_CASES[case]).eval()
    source = _export(model, torch.randn(1, 3, 5, 6), tmp_path / "m.onnx")
    for method, extra in (("synflow", {}), ("npb", {}), ("dpai", {"steps": 5}), ("snip", {"data": "random"}), ("grasp", {"data": "random"})):
        masks = []
        for graph in (load_onnx_model(source), lower_module(model, (torch.randn(1, 3, 5, 6),), "fx")):
            result = optimize(graph, sparsity=0.5, method=method, **extra)  # type: ignore[arg-type]
            masks.append({p.origin: p.mask for p in result.graph.prunable_params()})
        assert all(m is not None and 0.3 < m.mean() < 0.7 for m in masks[0].values()), method
        if method in ("synflow", "npb"):  # path criteria: the two routes count the same paths, so they keep the same weights
            assert all(np.array_equal(masks[0][k], masks[1][k]) for k in masks[0]), method


def test_flops_of_a_resize(tmp_path: Path) -> None:
    from pai_compiler.pass_infra import AnalysisManager
    from pai_compiler.passes.analysis.flops import FlopsPass

    for mode, macs in (("nearest", 0), ("linear", 1 * 2 * 10 * 12 * 4)):
        g = load_onnx_model(_resize_model(tmp_path / f"{mode}.onnx", [1, 2, 5, 6], scales=[1, 1, 2, 2], mode=mode))
        result = AnalysisManager(g).get(FlopsPass(effective=False))
        (node,) = [n for n in g.nodes if n.kind is OpKind.OPAQUE]
        assert result.node(node.name).dense == macs and not result.warnings, result


def test_sizes_computed_from_symbolic_dims_fold(tmp_path: Path) -> None:
    """``interpolate(scale_factor=1.5, recompute_scale_factor=True)`` with dynamic H, W: the exporter
    computes the sizes as Floor(Cast(H) * 1.5); they fold to floor(1.5*H), bound at run time."""
    model = _UpCNN(scale_factor=1.5, mode="bilinear", recompute_scale_factor=True).eval()
    path = tmp_path / "dyn.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (torch.randn(1, 3, 4, 5),), str(path), opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}}, dynamo=False)
    g = load_onnx_model(path)
    _only_resize(g)
    x = torch.randn(2, 3, 6, 7)
    with torch.no_grad():
        ours = Interpreter(g, bind={"N": 2, "H": 6, "W": 7}).run([x]).outputs[0]
    assert ours.shape == (2, 6, 9, 10) and torch.allclose(ours, model(x), atol=1e-5)


@pytest.mark.parametrize("case", ["nearest", "bilinear"])
def test_dpai_channel_connectivity_equals_per_pixel(tmp_path: Path, case: str) -> None:
    """DPaI's channel program runs a resize through its path rule (per pixel, the fallback for
    operators without a channel rule): the surviving nodes, kernels and weights it sees equal the
    per-pixel objective's; ``dpai{paths=ref}`` (per pixel) runs too."""
    from pai_compiler.passes.analysis.bindings import sample_bindings
    from pai_compiler.passes.criteria.dpai.driver import build
    from pai_compiler.passes.criteria.dpai.loop import PixelStep
    from pai_compiler.passes.criteria.dpai.pixel_paths import PixelObjective
    from pai_compiler.pass_infra import PassManager
    from pai_compiler.pipeline import parse_pipeline

    g = load_onnx_model(_export(_UpCNN(**UP_CASES[case]).eval(), torch.randn(1, 3, 5, 6), tmp_path / "m.onnx"))
    keep = dict(PassManager(parse_pipeline("erk{sparsity=0.7}")).run(g)[0].report.keep)
    layout, topk, update, step = build(g, g.prunable_params(), keep, "channel", 0.99, 0.5, "cpu", sample_bindings(g), "auto")
    scores = torch.rand(layout.numel, generator=torch.Generator().manual_seed(3))
    kept = update.kept(topk.select(scores))
    chan = step(scores, kept, None).read()
    pixel = PixelStep(PixelObjective(g, layout, "ref", "cpu", sample_bindings(g)), update)(torch.ones(layout.numel), kept, None).read()
    assert (chan["nodes"], chan["kernels"], chan["params"]) == (pixel["nodes"], pixel["kernels"], pixel["params"])
    assert np.isfinite(chan["log_paths"]) and np.isfinite(pixel["log_paths"])
    result = optimize(load_onnx_model(tmp_path / "m.onnx"), pipeline="erk{sparsity=0.7},dpai{steps=3,paths=ref}")
    assert all(p.mask is not None for p in result.graph.prunable_params())
