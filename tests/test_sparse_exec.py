"""Sparse execution (``paic compact -o FAST.pt``): exact outputs, the report's schema, never slower.

* The kernels (CSR over the used im2col taps; linear over the used input features) equal
  ``F.conv2d`` / ``F.linear`` on strided, dilated, asymmetrically padded and 1×1 convolutions.
* With every eligible layer forced sparse (``policy="sparse"``) the module equals the masked
  model — onnxruntime on a hand-made wide model, the IR interpreter on the example models —
  to a max relative error of 1e-5, and it pickles.
* ``policy="auto"`` keeps a sparse kernel only when its measured median beats the dense one,
  and falls back to all-dense when the whole model is not faster (checked with fixed timings,
  never with wall-clock assertions).
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from pai_compiler import api
from pai_compiler.audit import masks_from_zeros
from pai_compiler.backends import sparse_forward, sparse_select, sparse_timing
from pai_compiler.backends.sparse_fusion import fuse_for_inference
from pai_compiler.backends.sparse_kernels import GATHERS, PackedConv2d, SparseConv2d, SparseLinear
from pai_compiler.backends.sparse_operator import ConvOperator
from pai_compiler.backends.sparse_pool import window_pool_2d
from pai_compiler.backends.sparse_timing import PLAIN, LayerTiming, SparseExecReport, relative_error
from pai_compiler.backends.sparse_select import build_sparse_module
from pai_compiler.backends.torch_sparse import OPERATOR, SparseModule, sparse_kernel
from pai_compiler.cli import app
from pai_compiler.errors import PaicError
from pai_compiler.interp import Interpreter
from pai_compiler.ort import session

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "models"
LAYER_KEYS = {"node", "kind", "weight_shape", "density", "columns_used", "columns", "choice", "dense_ms", "sparse_ms", "reason"}
REPORT_KEYS = {"schema", "device", "batch", "threads", "repeats", "warmup", "layers", "model_dense_ms", "model_chosen_ms",
               "fallback", "memory_format", "memory_format_ms", "max_relative_error", "sparse_layers", "speedup", "onnxruntime_ms",
               "onnxruntime_note", "advice", "forward", "forward_ms", "forward_note"}


def _sparse(shape: tuple[int, ...], density: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * (torch.rand(shape, generator=generator) < density)


@pytest.mark.parametrize("pads,strides,dilations,kernel", [
    ([1, 1, 1, 1], [1, 1], [1, 1], 3), ([0, 1, 2, 1], [2, 1], [1, 2], 3), ([0, 0, 0, 0], [1, 1], [1, 1], 1),
    ([2, 2, 2, 2], [2, 2], [2, 2], 5),
])
@pytest.mark.parametrize("gather", GATHERS)
@pytest.mark.parametrize("batch", [1, 3])
def test_sparse_conv_kernel_equals_conv2d(pads: list[int], strides: list[int], dilations: list[int], kernel: int, gather: str,
                                          batch: int) -> None:
    weight = _sparse((12, 8, kernel, kernel), 0.1, seed=kernel)
    bias = torch.randn(12)
    x = torch.randn(batch, 8, 11, 9)
    ref = F.conv2d(F.pad(x, [pads[1], pads[3], pads[0], pads[2]]), weight, bias, stride=strides, dilation=dilations)
    conv = SparseConv2d(weight, bias, pads, strides, dilations, gather=gather)
    for _ in range(2):  # the second call reads the cached offset table
        got = conv(x)
        assert got.shape == ref.shape and relative_error(got, ref) <= 1e-5
    nhwc = x.contiguous(memory_format=torch.channels_last)
    assert relative_error(SparseConv2d(weight, None, pads, strides, dilations, gather=gather)(nhwc), ref - bias.reshape(1, -1, 1, 1)) <= 1e-5
    assert relative_error(_reloaded(conv)(x), ref) <= 1e-5 and not _reloaded(conv)._index_cache


@pytest.mark.parametrize("dims,groups,pads,strides,dilations", [
    (2, 1, [1, 1, 1, 1], [1, 1], [1, 1]), (2, 2, [0, 1, 2, 1], [2, 1], [1, 2]), (2, 4, [1, 1, 1, 1], [1, 1], [1, 1]),
    (1, 1, [2, 0], [1], [2]), (1, 2, [1, 1], [2], [1]), (3, 1, [1, 0, 1, 1, 0, 1], [1, 2, 1], [1, 1, 2]),
])
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_operator_equals_conv(dims: int, groups: int, pads: list[int], strides: list[int], dilations: list[int],
                                   batch: int) -> None:
    weight = _sparse((8, 4 // groups, *[3] * dims), 0.3, seed=dims + groups)
    bias = torch.randn(8)
    x = torch.randn(batch, 4, *[9, 7, 6][:dims])
    padding = [p for axis in reversed(range(dims)) for p in (pads[axis], pads[axis + dims])]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    ref = conv(F.pad(x, padding), weight, bias, stride=strides, dilation=dilations, groups=groups)
    kernel = ConvOperator(weight, bias, pads, strides, dilations, groups, tuple(x.shape[1:]))
    assert kernel(x).shape == ref.shape and relative_error(kernel(x), ref) <= 1e-5
    assert relative_error(_reloaded(kernel)(x), ref) <= 1e-5
    assert kernel.entries <= int((weight != 0).sum()) * ref[0, 0].numel()  # padding reads are absent
    if dims == 2:
        assert relative_error(kernel(x.contiguous(memory_format=torch.channels_last)), ref) <= 1e-5
    with pytest.raises(ValueError, match="built for inputs"):
        kernel(torch.randn(batch, 4, *[5] * dims))


@pytest.mark.parametrize("kernel,strides", [([2, 2], [2, 2]), ([3, 3], [2, 2]), ([3, 2], [1, 2]), ([2, 3], [2, 1])])
@pytest.mark.parametrize("batch", [1, 3])
def test_window_pools_equal_torch_pools(kernel: list[int], strides: list[int], batch: int) -> None:
    pool = window_pool_2d({"mode": "max", "kernel_shape": kernel, "strides": strides, "pads": [0, 0, 0, 0]})
    assert pool is not None
    x = torch.randn(batch, 5, 11, 8)
    ref = F.max_pool2d(x, kernel, strides)
    views = [x, x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)]
    assert all(torch.equal(pool(v), ref) for v in views)
    average = window_pool_2d({"mode": "avg", "kernel_shape": kernel, "strides": strides, "count_include_pad": True})
    assert average is not None and relative_error(average(x), F.avg_pool2d(x, kernel, strides)) <= 1e-6
    for odd in ({"pads": [1, 1, 1, 1]}, {"dilations": [2, 2]}, {"ceil_mode": 1}, {"kernel_shape": [2]}, {"mode": "sum"}):
        assert window_pool_2d({"mode": "max", "kernel_shape": kernel, "strides": strides, **odd}) is None


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("pads", [[1, 1, 1, 1], [0, 1, 2, 1]])
def test_dense_conv_packed_or_plain_equals_conv2d(packed: bool, pads: list[int]) -> None:
    weight, bias, x = _sparse((6, 4, 3, 3), 0.5, seed=7), torch.randn(6), torch.randn(2, 4, 9, 8)
    ref = F.relu(F.conv2d(F.pad(x, [pads[1], pads[3], pads[0], pads[2]]), weight, bias, stride=[2, 1]))
    kernel = PackedConv2d(weight, bias, pads, [2, 1], [1, 1], 1, relu=True, packed=packed)
    assert relative_error(kernel(x), ref) <= 1e-5 and relative_error(_reloaded(kernel)(x), ref) <= 1e-5


def test_sparse_layers_count_no_dense_choice() -> None:
    rows = [LayerTiming(node=f"n{i}", kind="conv", weight_shape=(1, 1, 1, 1), density=1.0, columns_used=1, columns=1, choice=choice,
                        dense_ms=1.0, sparse_ms={}, reason="") for i, choice in enumerate(["dense", PLAIN, "csr/window", "csr/operator"])]
    assert SparseExecReport(device="cpu", batch=1, threads=1, repeats=1, warmup=0, layers=rows).sparse_layers == 2


def test_sparse_kernels_use_only_the_read_taps() -> None:
    weight = torch.zeros(4, 6, 3, 3)
    weight[0, 2, 1, 1] = 1.5
    weight[3, 5, 0, 2] = -2.0
    assert SparseConv2d(weight, None, [1, 1, 1, 1], [1, 1], [1, 1]).used_taps == 2
    linear = torch.zeros(5, 7)
    linear[1, 3] = linear[4, 3] = linear[2, 6] = 1.0
    assert SparseLinear(linear, None).used_columns == 2


def test_sparse_linear_kernel_equals_linear() -> None:
    weight = _sparse((24, 40), 0.05, seed=1)
    weight[:, 0] = 0.0  # an unread input feature
    bias = torch.randn(24)
    x = torch.randn(2, 5, 40)
    got = SparseLinear(weight, bias, alpha=0.5, beta=2.0)(x)
    assert relative_error(got, 0.5 * F.linear(x, weight) + 2.0 * bias) <= 1e-5


def _wide_model(rng: np.random.Generator, density: float) -> onnx.ModelProto:
    """conv 3->32, conv 32->96 (3×3), conv 96->96 (1×1), pool, gemm 96->128, relu, gemm 128->10; zeros = pruned."""
    def zeros(shape: tuple[int, ...], keep: float) -> np.ndarray:
        return (rng.standard_normal(shape) * (rng.random(shape) < keep)).astype(np.float32)

    inits = {"w1": zeros((32, 3, 3, 3), 0.5), "b1": zeros((32,), 1.0), "w2": zeros((96, 32, 3, 3), density),
             "w3": zeros((96, 96, 1, 1), density), "b3": zeros((96,), 1.0), "w4": zeros((128, 96), density),
             "b4": zeros((128,), 1.0), "w5": zeros((10, 128), density)}
    node = helper.make_node
    nodes = [node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), node("Relu", ["c1"], ["r1"]),
             node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]), node("Relu", ["c2"], ["r2"]),
             node("Conv", ["r2", "w3", "b3"], ["c3"]), node("GlobalAveragePool", ["c3"], ["p"]),
             node("Flatten", ["p"], ["f"]), node("Gemm", ["f", "w4", "b4"], ["g"], transB=1),
             node("Relu", ["g"], ["r4"]), node("Gemm", ["r4", "w5"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _reloaded(module: torch.nn.Module) -> torch.nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_wide_model_all_sparse_equals_masked_onnxruntime(tmp_path: Path) -> None:
    path = tmp_path / "wide.onnx"
    onnx.save(_wide_model(np.random.default_rng(0), density=0.05), path)
    graph = api.load_model(path)
    masks_from_zeros(graph)
    api.compact_graph(graph)
    module, report = build_sparse_module(graph, batch=2, repeats=1, warmup=0, policy="sparse")
    assert {row.kind for row in report.layers} == {"conv", "linear"}
    assert all(row.choice.startswith("csr") for row in report.layers), [row.reason for row in report.layers]
    x = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)
    sess = session(path, threads=1)
    ref = torch.from_numpy(sess.run(None, {"x": x})[0])
    with torch.no_grad():
        got = _reloaded(module)(torch.from_numpy(x))
    assert relative_error(got, ref) <= 1e-5


@pytest.mark.parametrize("name", ["resnet20", "vgg_small", "tiny_vit"])
def test_example_models_all_sparse_equal_the_masked_interpreter(name: str) -> None:
    graph = api.load_model(EXAMPLES / f"{name}.onnx")
    api.optimize(graph, sparsity=0.95, method="random-erk")
    masked = graph.clone()
    api.compact_graph(graph)
    module, report = build_sparse_module(graph, batch=1, repeats=1, warmup=0, policy="sparse")
    assert report.sparse_layers > 0
    shape = [2, *[d for d in masked.inputs[0].shape[1:]]]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = Interpreter(masked).run([x]).outputs[0]
        got = module(x)
    assert relative_error(got, ref) <= 1e-5


@pytest.mark.parametrize("form", [*GATHERS, OPERATOR])
def test_every_conv_form_in_a_model_equals_the_masked_interpreter(form: str) -> None:
    """Each conv form on every conv of ResNet-20 (strided, 1x1 and residual convs, batch 2): the
    window form's output is a strided view, the operator's a transposed one, the next layers read both."""
    graph = api.load_model(EXAMPLES / "resnet20.onnx")
    api.optimize(graph, sparsity=0.95, method="random-erk")
    masked = graph.clone()
    api.compact_graph(graph)
    module = SparseModule(graph)
    fuse_for_inference(module)  # what build_sparse_module does before choosing (it then drops the weights no layer reads)
    x = torch.randn([2, *masked.inputs[0].shape[1:]], generator=torch.Generator().manual_seed(4))
    shapes: dict[str, tuple[int, ...]] = {}
    with torch.no_grad():
        module.run([x], on_layer=lambda node, args: shapes.setdefault(node.name, tuple(args[0].shape)))
    installed = 0
    for node in module.graph.nodes:
        kernel = sparse_kernel(module, node, "csr", form, in_shape=shapes.get(node.name)) if node.kind.value == "conv" else None
        if kernel is not None:
            module.install(node.name, kernel)
            installed += 1
    assert installed >= 19
    with torch.no_grad():
        ref = Interpreter(masked).run([x]).outputs[0]
        assert relative_error(module(x), ref) <= 1e-5
        assert relative_error(module(x), module.run([x], sparse=False)[0]) <= 1e-5  # against the same folded weights
        assert relative_error(_reloaded(module)(x), ref) <= 1e-5


def _patch_times(monkeypatch: pytest.MonkeyPatch, fake: Callable[..., dict[str, float]]) -> None:
    """Every timing of the build (layers, the model, onnxruntime, the forward forms) by ``fake``."""
    for module in (sparse_select, sparse_forward):
        monkeypatch.setattr(module, "time_alternating", fake)


def _fixed_times(per_layer: Mapping[str, float], model: Mapping[str, float], versus_ort: Mapping[str, float] | None = None) -> Callable[..., dict[str, float]]:
    """A stand-in for time_alternating: layer candidates get ``per_layer``, the whole-model check ``model``,
    the module against onnxruntime ``versus_ort``."""
    def fake(candidates: Mapping[str, Any], **_: Any) -> dict[str, float]:
        for run in candidates.values():
            run()
        table = model if "chosen" in candidates else (versus_ort or {}) if "onnxruntime" in candidates else per_layer
        return {name: table.get(name, 1.0) for name in candidates}
    return fake


@pytest.mark.parametrize("model_times,fallback", [
    ({"dense": 10.0, "chosen": 5.0, "other": 6.0}, False), ({"dense": 10.0, "chosen": 12.0, "other": 13.0}, True),
    ({"dense": 10.0, "chosen": 9.9, "other": 5.0}, False),  # the chosen kernels pay in the other memory format
    ({"dense": 10.0, "chosen": 12.0, "other": 9.9}, True),  # ... but not enough: back to dense in the dense model's format
])
def test_auto_choice_keeps_faster_kernels_and_never_a_slower_model(monkeypatch: pytest.MonkeyPatch, model_times: dict[str, float],
                                                                   fallback: bool) -> None:
    _patch_times(monkeypatch, _fixed_times({"dense": 2.0, "csr": 1.0, "csr/copy": 1.0, "csr/index": 1.5}, model_times))
    graph = api.load_model(EXAMPLES / "vgg_small.onnx")
    api.optimize(graph, sparsity=0.9, method="magnitude")
    api.compact_graph(graph)
    module, report = build_sparse_module(graph, batch=1, repeats=1, warmup=0)
    doc = json.loads(json.dumps(report.to_dict()))
    assert set(doc) == REPORT_KEYS and all(set(row) == LAYER_KEYS for row in doc["layers"])
    assert bool(doc["fallback"]) is fallback
    dense_format = min(doc["memory_format_ms"], key=doc["memory_format_ms"].__getitem__)  # all 1.0: the first, contiguous
    switched = not fallback and model_times["other"] < model_times["chosen"]
    assert doc["memory_format"] == module.memory_format == ("channels_last" if switched else dense_format)
    assert doc["model_chosen_ms"] <= doc["model_dense_ms"]
    chosen = {row["choice"] for row in doc["layers"]}
    assert chosen == ({"dense"} if fallback else {"csr", "csr/copy"})  # the fastest exact kernel per layer
    assert len(module.kernel_of) == (0 if fallback else len(doc["layers"]))
    assert doc["max_relative_error"] <= 1e-5


def test_auto_choice_keeps_a_slower_sparse_layer_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_times(monkeypatch, _fixed_times({"dense": 1.0, "csr": 3.0, "csr/copy": 3.0, "csr/index": 2.0}, {}))
    graph = api.load_model(EXAMPLES / "resnet20.onnx")
    api.optimize(graph, sparsity=0.95, method="random-erk")
    api.compact_graph(graph)
    module, report = build_sparse_module(graph, batch=1, repeats=1, warmup=0)
    assert report.layers and all(row.choice == "dense" and "not faster" in row.reason for row in report.layers)
    assert not module.kernel_of and report.speedup == 1.0


def test_policy_dense_module_equals_compact_and_rejects_unknown_policy() -> None:
    graph = api.load_model(EXAMPLES / "resnet20.onnx")
    api.optimize(graph, sparsity=0.9, method="magnitude")
    api.compact_graph(graph)
    module, report = build_sparse_module(graph, repeats=1, warmup=0, policy="dense")
    assert isinstance(module, SparseModule) and not module.kernel_of
    assert report.onnxruntime_ms is None and "not ONNX" in report.onnxruntime_note  # no onnx_twin given
    with pytest.raises(Exception, match="policy must be one of"):
        build_sparse_module(graph, policy="fastest")


def _paic(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pai_compiler.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_compact_pt_writes_the_sparse_module_and_its_report(tmp_path: Path) -> None:
    onnx.save(_wide_model(np.random.default_rng(2), density=0.02), tmp_path / "wide.onnx")
    run = _paic("compact", "wide.onnx", "-o", "fast.pt", "--report", "r.json", "--batch", "2", "--threads", "1", "-q", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    doc = json.loads((tmp_path / "r.json").read_text())["sparse_exec"]
    assert set(doc) == REPORT_KEYS and doc["batch"] == 2 and doc["threads"] == 1 and doc["device"] == "cpu"
    assert len(doc["layers"]) == 5 and doc["model_chosen_ms"] <= doc["model_dense_ms"]
    module = torch.load(tmp_path / "fast.pt", weights_only=False)
    x = np.random.default_rng(4).standard_normal((2, 3, 16, 16)).astype(np.float32)
    ref = session(tmp_path / "wide.onnx", threads=1).run(None, {"x": x})[0]
    with torch.no_grad():
        assert relative_error(module(torch.from_numpy(x)), torch.from_numpy(ref)) <= 1e-5


@pytest.mark.parametrize("args,needle", [
    (("-o", "small.onnx", "--batch", "2"), "use -o FAST.pt"),
    (("-o", "fast.pt", "--batch", "0"), "--batch must be a positive integer"),
    (("-o", "fast.pt", "--threads", "0"), "--threads must be a positive integer"),
])
def test_cli_compact_flag_errors(tmp_path: Path, args: tuple[str, ...], needle: str) -> None:
    onnx.save(_wide_model(np.random.default_rng(2), density=0.1), tmp_path / "wide.onnx")
    out = [str(tmp_path / a) if a.endswith((".pt", ".onnx")) else a for a in args]
    run = CliRunner().invoke(app, ["compact", str(tmp_path / "wide.onnx"), *out])  # in-process: a usage error is fast
    assert run.exit_code == 2 and needle in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda)")
@pytest.mark.parametrize("policy", ["sparse", "auto"])
def test_cuda_choice_is_exact(tmp_path: Path, policy: str) -> None:
    onnx.save(_wide_model(np.random.default_rng(5), density=0.05), tmp_path / "wide.onnx")
    graph = api.load_model(tmp_path / "wide.onnx")
    masks_from_zeros(graph)
    api.compact_graph(graph)
    module, report = build_sparse_module(graph, batch=4, device="cuda", repeats=3, warmup=1, policy=policy)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        got = _reloaded(module)(x.cuda()).cpu()
    assert report.device == "cuda" and report.model_chosen_ms <= report.model_dense_ms
    assert relative_error(got, Interpreter(graph).run([x]).outputs[0]) <= 1e-5


def _node_by_node(module: SparseModule, x: torch.Tensor) -> torch.Tensor:
    """The module evaluated through the interpreter, node by node (the path a layer hook takes)."""
    return module.run([x], on_layer=lambda node, args: None)[0]


def test_compiled_forward_equals_node_by_node_at_another_batch_and_follows_changes() -> None:
    graph = api.load_model(EXAMPLES / "vgg_small.onnx")
    api.optimize(graph, sparsity=0.95, method="random-erk")
    api.compact_graph(graph)
    module, report = build_sparse_module(graph, batch=1, repeats=1, warmup=0, policy="sparse")
    assert report.sparse_layers > 0
    x = torch.randn([3, *graph.inputs[0].shape[1:]], generator=torch.Generator().manual_seed(7))  # batch 3, built at 1
    with torch.no_grad():
        ref = _node_by_node(module, x)
        assert relative_error(module(x), ref) <= 1e-6
        sparse_node = next(iter(module.kernel_of))
        step = next(s for s in module.plan([x]).steps if s.node == sparse_node)
        assert step.kernel == module.kernel_of[sparse_node]
        for name in list(module.kernel_of):  # back to dense: the compiled forward must not keep the sparse kernels
            module.install(name, None)
        step = next(s for s in module.plan([x]).steps if s.node == sparse_node)
        assert step.kernel == module.dense_of[sparse_node]
        assert relative_error(module(x), ref) <= 1e-5
        reloaded = _reloaded(module)
        assert not reloaded._plans and relative_error(reloaded(x), ref) <= 1e-5
        state = module.__getstate__()
        del state["_plans"]  # as pickled before the compiled forward existed
        old = SparseModule.__new__(SparseModule)
        old.__setstate__(state)
        assert relative_error(old(x), ref) <= 1e-5


def test_conv1d_with_fused_relu_is_exact(tmp_path: Path) -> None:
    """A 1-d conv has no packed kernel: the ReLU fused into it must still be applied (it was dropped once)."""
    weight = np.random.default_rng(0).standard_normal((8, 4, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    graph_proto = helper.make_graph(nodes, "conv1d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 10])],
                                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 10])], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "conv1d.onnx")
    graph = api.load_model(tmp_path / "conv1d.onnx")
    module, _ = build_sparse_module(graph, batch=1, repeats=1, warmup=0, policy="dense")
    x = torch.randn(2, 4, 10)
    with torch.no_grad():
        assert relative_error(module(x), F.relu(F.conv1d(x, torch.from_numpy(weight), padding=1))) <= 1e-5


@pytest.mark.parametrize("ort_ms,advised", [(0.5, True), (3.0, False)])
def test_onnxruntime_faster_is_said_in_the_report_and_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ort_ms: float,
                                                          advised: bool) -> None:
    _patch_times(monkeypatch, _fixed_times({"dense": 1.0}, {}, {"torch": 2.0, "onnxruntime": ort_ms}))
    onnx.save(_wide_model(np.random.default_rng(2), density=0.1), tmp_path / "wide.onnx")
    run = CliRunner().invoke(app, ["compact", str(tmp_path / "wide.onnx"), "-o", str(tmp_path / "fast.pt"), "--report", str(tmp_path / "r.json")])
    assert run.exit_code == 0, run.output
    doc = json.loads((tmp_path / "r.json").read_text())["sparse_exec"]
    assert set(doc) == REPORT_KEYS and doc["schema"] == 3 and doc["onnxruntime_ms"] == ort_ms and not doc["onnxruntime_note"]
    lines = [line for line in run.stdout.splitlines() if "compact ONNX" in line]
    assert len(lines) == 1
    if advised:
        assert "-o fast.onnx --align auto" in doc["advice"] and "0.500 ms against 2.000 ms" in doc["advice"]
        assert doc["advice"] in lines[0]
    else:
        assert doc["advice"] == "" and "not faster" in lines[0]


def test_onnxruntime_missing_is_noted_not_timed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = sparse_select.importlib.util.find_spec
    monkeypatch.setattr(sparse_select.importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
    written: list[Path] = []
    graph = api.load_model(EXAMPLES / "vgg_small.onnx")
    _, report = build_sparse_module(graph, repeats=1, warmup=0, policy="dense", onnx_twin=written.append)
    assert report.onnxruntime_ms is None and "not installed" in report.onnxruntime_note and not report.advice and not written


def test_compiled_forward_names_the_node_a_wrong_input_fails_at() -> None:
    graph = api.load_model(EXAMPLES / "vgg_small.onnx")
    module, _ = build_sparse_module(graph, batch=1, repeats=1, warmup=0, policy="dense")
    first_conv = next(n.name for n in graph.nodes if n.kind.value == "conv")
    with torch.no_grad(), pytest.raises(PaicError, match=rf"node '{re.escape(first_conv)}': cannot be evaluated in torch on inputs \[\(1, 4, 32, 32\)\]"):
        module(torch.randn(1, 4, 32, 32))  # 4 channels where the first conv reads 3
    with pytest.raises(PaicError, match="model has 1 inputs, got 2"):
        module(torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32))


def test_time_alternating_reports_median_or_fastest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run of the candidate lasts the next of ``durations`` (a clock that advances only there)."""
    durations = iter([0.004, 0.001, 0.009])
    clock = {"now": 0.0, "start": True}

    def fake_clock() -> float:
        if not clock["start"]:
            clock["now"] += next(durations)
        clock["start"] = not clock["start"]
        return clock["now"]

    monkeypatch.setattr(sparse_timing.time, "perf_counter", fake_clock)
    assert sparse_timing.time_alternating({"a": lambda: None}, repeats=3, warmup=0, statistic="min") == {"a": pytest.approx(1.0)}
    durations, clock["start"] = iter([0.004, 0.001, 0.009]), True
    assert sparse_timing.time_alternating({"a": lambda: None}, repeats=3, warmup=0) == {"a": pytest.approx(4.0)}
    with pytest.raises(ValueError, match="statistic"):
        sparse_timing.time_alternating({"a": lambda: None}, repeats=1, warmup=0, statistic="mean")


def test_sparse_kernel_refuses_a_module_whose_weights_were_dropped() -> None:
    """After build_sparse_module a layer on a kernel no longer holds its folded weight: a new kernel
    would silently read the unfolded graph weight, so asking for one is an error naming the node."""
    graph = api.load_model(EXAMPLES / "vgg_small.onnx")
    api.optimize(graph, sparsity=0.9, method="random-erk")
    api.compact_graph(graph)
    module, _ = build_sparse_module(graph, batch=1, repeats=1, warmup=0, policy="sparse")
    node = module.graph.node(next(iter(module.kernel_of)))
    with pytest.raises(PaicError, match=re.escape(node.name) + ".*drop_unused_weights"):
        sparse_kernel(module, node, "csr", "window")
