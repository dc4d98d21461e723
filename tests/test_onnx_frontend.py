"""ONNX frontend: every example and the onnx package's real architectures lower to an IR whose
torch evaluation equals onnxruntime; hand-built graphs cover Gemm/MatMul variants, shared and
Constant weights, grouped and padded convs, pooling, Split/Concat/Sum."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pai_compiler.frontends.onnx.reader import import_onnx, load_onnx_model
from pai_compiler.interp import Interpreter
from pai_compiler.ort import session

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
EXPECTED_PRUNABLE = {"resnet20": (22, 270_896), "vgg_small": (7, 39_728), "tiny_vit": (10, 78_464)}


def assert_matches_ort(model: onnx.ModelProto | Path, graph, x: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    sess = session(model)
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    out = Interpreter(graph).run([torch.from_numpy(x)]).outputs[0].detach().numpy()
    assert out.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * scale)


def test_examples_lower_and_match_ort(example_model: Path) -> None:
    g = load_onnx_model(example_model)
    layers, weights = EXPECTED_PRUNABLE[example_model.stem]
    assert len(g.prunable_params()) == layers
    assert sum(p.numel for p in g.prunable_params()) == weights
    assert g.meta["warnings"] == []
    assert str(g.inputs[0].shape[0]) == "batch"  # dynamic batch stays symbolic
    shape = [3, *g.inputs[0].shape[1:]]
    assert_matches_ort(example_model, g, np.random.RandomState(0).randn(*shape).astype(np.float32))


@pytest.mark.parametrize("name", ["resnet20", "tiny_vit"])
def test_dynamo_export_lowers_like_legacy(tmp_path: Path, name: str) -> None:
    pytest.importorskip("onnxscript")
    from pai_compiler.lab import zoo
    from pai_compiler.backends.torch_onnx import export_onnx

    torch.manual_seed(0)
    model = zoo.build(name)
    path = tmp_path / f"{name}_dynamo.onnx"
    export_onnx(model, zoo.input_shape(name), path, dynamo=True)
    g = load_onnx_model(path)
    legacy = load_onnx_model(Path(__file__).parents[1] / "examples" / "models" / f"{name}.onnx")
    assert sorted(p.numel for p in g.prunable_params()) == sorted(p.numel for p in legacy.prunable_params())
    assert_matches_ort(path, g, np.random.RandomState(1).randn(2, *zoo.input_shape(name)).astype(np.float32))


@pytest.mark.parametrize("path", sorted(LIGHT.glob("*.onnx")), ids=lambda p: p.stem)
def test_onnx_light_architectures(path: Path) -> None:
    """Real architectures whose weights come from ConstantOfShape nodes."""
    g = load_onnx_model(path)
    assert g.prunable_params(), "conv/linear weights must be found"
    assert all(g.meta["weight_sources"][p.origin] in ("constant_of_shape", "initializer", "constant_node", "computed") for p in g.prunable_params())
    shape = [int(d) for d in g.inputs[0].shape]
    assert_matches_ort(path, g, np.random.RandomState(0).rand(*shape).astype(np.float32))


def _model(nodes, inits, in_shape, out_shape, opset=18):  # type: ignore[no-untyped-def]
    graph = helper.make_graph(
        nodes, "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(m)
    return m


RNG = np.random.RandomState(0)


def _w(*shape: int) -> np.ndarray:
    return RNG.randn(*shape).astype(np.float32)


CASES = {
    "gemm_transB0_alpha_beta": (
        [helper.make_node("Gemm", ["x", "W", "b"], ["y"], alpha=0.5, beta=2.0, transB=0)],
        {"W": _w(6, 4), "b": _w(4)}, ["N", 6], ["N", 4], 1),
    "gemm_transA": (
        [helper.make_node("Gemm", ["x", "W"], ["y"], transA=1, transB=1)],
        {"W": _w(4, 6)}, [6, 5], [5, 4], 1),
    "matmul_shared_weight": (
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W"], ["y"])],
        {"W": _w(5, 5)}, ["N", 3, 5], ["N", 3, 5], 1),
    "grouped_conv_asym_pads": (
        [helper.make_node("Conv", ["x", "W", "B"], ["y"], group=2, pads=[0, 1, 2, 1], strides=[2, 1], dilations=[1, 2])],
        {"W": _w(6, 2, 3, 3), "B": _w(6)}, ["N", 4, 9, 8], ["N", 6, 5, 6], 1),
    "depthwise_same_upper": (
        [helper.make_node("Conv", ["x", "W"], ["y"], group=4, auto_pad="SAME_UPPER", strides=[2, 2])],
        {"W": _w(4, 1, 3, 3)}, ["N", 4, 7, 7], ["N", 4, 4, 4], 1),
    "pools_and_concat": (
        [helper.make_node("MaxPool", ["x"], ["a"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
         helper.make_node("AveragePool", ["x"], ["b"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0),
         helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
         helper.make_node("ReduceMean", ["c", "axes"], ["y"], keepdims=0)],
        {"axes": np.array([2, 3], dtype=np.int64)}, ["N", 3, 8, 8], ["N", 6], 0),
    "split_sum_constant_weight": (
        [helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(_w(4, 4, 1, 1), "Wc")),
         helper.make_node("Conv", ["x", "W"], ["h"], kernel_shape=[1, 1]),
         helper.make_node("Split", ["h", "sizes"], ["s1", "s2"], axis=1),
         helper.make_node("Sum", ["s1", "s2", "s1"], ["y"])],
        {"sizes": np.array([2, 2], dtype=np.int64)}, ["N", 4, 5, 5], ["N", 2, 5, 5], 1),
    "flatten_gemm_softmax": (
        [helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("Gemm", ["f", "W"], ["g"], transB=1),
         helper.make_node("Softmax", ["g"], ["y"], axis=-1)],
        {"W": _w(3, 12)}, ["N", 3, 2, 2], ["N", 3], 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hand_built_graphs_match_ort(case: str) -> None:
    nodes, inits, in_shape, out_shape, n_prunable = CASES[case]
    m = _model(nodes, inits, in_shape, out_shape)
    m = onnx.shape_inference.infer_shapes(m)
    g = import_onnx(m, "t")
    assert len(g.prunable_params()) == n_prunable
    shape = [2 if isinstance(d, str) else d for d in in_shape]
    assert_matches_ort(m, g, RNG.randn(*shape).astype(np.float32))


def test_shared_weight_is_one_param() -> None:
    nodes, inits, in_shape, out_shape, _ = CASES["matmul_shared_weight"]
    g = import_onnx(_model(nodes, inits, in_shape, out_shape), "t")
    p = g.prunable_params()[0]
    assert len(g.param_users(p)) == 2 and p.out_axis == 1 and p.in_axis == 0


@pytest.mark.parametrize(("batch_dims", "index_shape"), [(0, (3, 2)), (0, (2, 2, 1)), (1, (2, 3, 1)), (1, (2, 2))])
def test_gather_nd_matches_the_onnx_reference(batch_dims: int, index_shape: tuple[int, ...]) -> None:
    """GatherND (numpy at compile time, torch in the interpreter) against onnx's reference evaluator,
    negative indices included."""
    from onnx.reference import ReferenceEvaluator

    from pai_compiler.interp_index_rules import gather_nd as torch_gather_nd
    from pai_compiler.ir import Graph, OpKind
    from pai_compiler.ir.shape_program import gather_nd

    rng = np.random.default_rng(0)
    data = rng.standard_normal((2, 3, 4)).astype(np.float32)
    depth = index_shape[-1]
    bounds = np.asarray(data.shape[batch_dims:batch_dims + depth])
    indices = (rng.integers(0, 1 << 16, index_shape) % bounds - bounds * rng.integers(0, 2, index_shape)).astype(np.int64)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("GatherND", ["d", "i"], ["y"], batch_dims=batch_dims)], "g",
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, data.shape), helper.make_tensor_value_info("i", TensorProto.INT64, index_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]))
    want = ReferenceEvaluator(model).run(None, {"d": data, "i": indices})[0]
    np.testing.assert_array_equal(gather_nd(data, indices, batch_dims), want)
    node = Graph().add_node(OpKind.OPAQUE, "g", [], [], attrs={"op": "gather_nd", "batch_dims": batch_dims})
    np.testing.assert_array_equal(torch_gather_nd(None, node, [torch.from_numpy(data), torch.from_numpy(indices)])[0].numpy(), want)
