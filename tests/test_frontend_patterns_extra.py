"""ONNX frontend fusions and lookups: the same torch model exported every way lowers to the same IR.

* tanh GELU, erf GELU, SiLU, Mish, HardSwish and LayerNorm, exported by the TorchScript
  exporter at opset 13/17/20 and by the dynamo exporter, give identical path counts, effective
  counts and DPaI masks (a decomposed product of activations would multiply path counts), and
  the IR still computes what onnxruntime computes; look-alikes with a wrong constant, another
  ``x`` or a non-trailing axis are left untouched.
* an ``nn.Embedding`` (Gather of an initializer by dynamic indices) loads as an embedding lookup
  with a dense table, like the torch.fx frontend's, and the rest of the model prunes.
* a bfloat16 / float8 weight read through ``Cast(to=FLOAT)`` is a prunable weight whose mask is
  written back to the low-precision initializer.
"""
from __future__ import annotations

import contextlib
import io
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from pai_compiler import api
from pai_compiler.audit import audit_graph
from pai_compiler.frontends.onnx.reader import import_onnx, load_onnx_model
from pai_compiler.interp import Interpreter
from pai_compiler.ir import Graph, OpKind
from pai_compiler.ort import session
from pai_compiler.backends.torch_onnx import export_onnx

PATH_KEYS = ("log_paths", "log_paths_dpai", "effective_params", "effective_nodes", "effective_nodes_npb", "effective_kernels", "total_nodes")


def _has_onnxscript() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


# (exporter, opset): TorchScript below 17 decomposes LayerNorm, below 20 GELU; dynamo writes its own forms
VARIANTS = [("ts", 13), ("ts", 17), ("ts", 20)] + ([("dynamo", 18)] if _has_onnxscript() else [])


def _mlp(act: nn.Module, norm: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, 16)] + ([nn.LayerNorm(16)] if norm else []) + [act, nn.Linear(16, 12), act, nn.Linear(12, 4)]
    return nn.Sequential(*layers).eval()


def _export(model: nn.Module, path: Path, exporter: str, opset: int) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, (8,), path, dynamo=exporter == "dynamo", opset=opset)
    return path


def _assert_matches_ort(path: Path, graph: Graph, x: np.ndarray, tol: float = 1e-5) -> None:
    sess = session(path)
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    out = Interpreter(graph).run([torch.from_numpy(x)]).outputs[0].detach().numpy()
    assert out.shape == ref.shape
    np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), rtol=tol, atol=tol * max(1.0, float(np.abs(ref).max())))


def _ops(graph: Graph) -> list[str]:
    """The non-weighted nodes' kinds and ops, e.g. ``pointwise/gelu``, ``norm/layer``, ``mul/mul``."""
    skip = {OpKind.INPUT, OpKind.OUTPUT, OpKind.LINEAR}
    return [f"{n.kind.value}/{n.attrs.get('op', n.attrs.get('type', ''))}" for n in graph.nodes if n.kind not in skip]


def _paths(graph: Graph) -> dict[str, Any]:
    totals = audit_graph(graph)["totals"]
    return {k: totals[k] for k in PATH_KEYS}


def _dpai_masks(path: Path) -> dict[str, np.ndarray]:
    result = api.optimize(str(path), sparsity=0.8, method="dpai", steps=20)
    return {p.name: p.mask_or_ones().copy() for p in result.graph.prunable_params()}


@pytest.mark.parametrize("act", ["gelu_tanh", "gelu"])
def test_every_export_of_gelu_and_layernorm_prunes_alike(tmp_path: Path, act: str) -> None:
    module = nn.GELU(approximate="tanh") if act == "gelu_tanh" else nn.GELU()
    x = np.random.RandomState(0).randn(3, 8).astype(np.float32)
    docs, masks = {}, {}
    for exporter, opset in VARIANTS:
        path = _export(_mlp(module), tmp_path / f"{act}_{exporter}{opset}.onnx", exporter, opset)
        g = load_onnx_model(path)
        assert _ops(g) == ["norm/layer", "pointwise/gelu", "pointwise/gelu"], (exporter, opset)
        assert all(n.attrs.get("approximate") == ("tanh" if act == "gelu_tanh" else "none") and n.attrs.get("scale", 1.0) == 1.0
                   for n in g.nodes if n.attrs.get("op") == "gelu")
        norm = next(n for n in g.nodes if n.kind is OpKind.NORM)
        assert norm.attrs["axis"] == -1 and norm.attrs["epsilon"] == pytest.approx(1e-5) and set(norm.params) == {"scale", "bias"}
        _assert_matches_ort(path, g, x)
        docs[(exporter, opset)] = _paths(g)
        masks[(exporter, opset)] = _dpai_masks(path)
    first = next(iter(docs.values()))
    assert first["log_paths"] == pytest.approx(math.log(8 * 16 * 12 * 4))  # dense: every input-output chain
    for key, doc in docs.items():
        assert doc == first, key
    reference = next(iter(masks.values()))
    for key, got in masks.items():
        assert got.keys() == reference.keys()
        for name in got:
            assert np.array_equal(got[name], reference[name]), (key, name)


@pytest.mark.parametrize(("name", "op"), [("silu", "silu"), ("mish", "mish"), ("hardswish", "hardswish"), ("layernorm_plain", "")])
def test_other_decomposed_forms_fuse(tmp_path: Path, name: str, op: str) -> None:
    module = {"silu": nn.SiLU(), "mish": nn.Mish(), "hardswish": nn.Hardswish(), "layernorm_plain": nn.ReLU()}[name]
    norm = nn.LayerNorm(16, elementwise_affine=False) if name == "layernorm_plain" else None
    x = np.random.RandomState(1).randn(3, 8).astype(np.float32)
    logs = set()
    for exporter, opset in [("ts", 13), *(([("dynamo", 18)]) if _has_onnxscript() else [])]:
        model = _mlp(module, norm=False)
        if norm is not None:
            model = nn.Sequential(model[0], norm, *list(model)[1:]).eval()
        path = _export(model, tmp_path / f"{name}_{exporter}.onnx", exporter, opset)
        g = load_onnx_model(path)
        expected = ["norm/layer", "pointwise/relu", "pointwise/relu"] if norm is not None else [f"pointwise/{op}"] * 2
        assert _ops(g) == expected, (exporter, opset)
        assert not any(n.kind is OpKind.MUL for n in g.nodes)
        _assert_matches_ort(path, g, x)
        logs.add(round(_paths(g)["log_paths"], 9))
    assert logs == {round(math.log(8 * 16 * 12 * 4), 9)}


class _Formula(nn.Module):
    """A hand-written activation/norm between two linears (exported op by op)."""

    def __init__(self, fn: Any, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.fn = nn.Linear(8, width), nn.Linear(width, 4), fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.fn(self.a(x)))


def _layernorm(dim: int) -> Any:
    def fn(h: torch.Tensor) -> torch.Tensor:
        d = h - h.mean(dim, keepdim=True)
        return d / torch.sqrt((d * d).mean(dim, keepdim=True) + 1e-6)
    return fn


def _reshaped_layernorm(h: torch.Tensor) -> torch.Tensor:
    return _layernorm(1)(h.reshape(-1, 4, 4)).reshape(-1, 16)  # normalises a non-trailing axis


LOOKALIKES: dict[str, tuple[Any, bool]] = {
    "tanh_gelu_by_hand": (lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3))), True),
    "tanh_gelu_wrong_cubic": (lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.05 * h ** 3))), False),
    "tanh_gelu_wrong_scale": (lambda h: 0.5 * h * (1 + torch.tanh(0.8 * (h + 0.044715 * h ** 3))), False),
    "tanh_gelu_other_x": (lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (2 * h + 0.044715 * (2 * h) ** 3))), False),
    "erf_gelu_wrong_root": (lambda h: h * (1 + torch.erf(h / 1.5)), False),
    "hardswish_other_alpha": (lambda h: h * torch.clamp(h / 5 + 0.5, 0, 1), False),
    "layernorm_by_hand": (_layernorm(-1), True),
    "layernorm_axis_not_last": (_reshaped_layernorm, False),
}


@pytest.mark.parametrize("case", sorted(LOOKALIKES))
def test_lookalikes_are_left_alone(tmp_path: Path, case: str) -> None:
    fn, fuses = LOOKALIKES[case]
    path = _export(_Formula(fn), tmp_path / f"{case}.onnx", "ts", 13)
    g = load_onnx_model(path)
    products = [n for n in g.nodes if n.kind is OpKind.MUL]
    assert (not products) == fuses, _ops(g)
    _assert_matches_ort(path, g, np.random.RandomState(2).randn(5, 8).astype(np.float32))


def test_half_precision_layernorm_with_casts_fuses(tmp_path: Path) -> None:
    model = _mlp(nn.GELU(approximate="tanh")).half()
    path = tmp_path / "half.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 8).half(),), str(path), dynamo=False, opset_version=13,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}})
    assert "Cast" in {n.op_type for n in onnx.load(str(path)).graph.node}
    g = load_onnx_model(path)
    assert _ops(g) == ["norm/layer", "pointwise/gelu", "pointwise/gelu"]
    _assert_matches_ort(path, g, np.random.RandomState(3).randn(3, 8).astype(np.float16), tol=5e-3)


# ---- embedding lookups -------------------------------------------------------------------------
class _Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.e, self.fc = nn.Embedding(50, 16), nn.Linear(16, 4)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.fc(self.e(idx))


@pytest.mark.parametrize("exporter", ["ts", "dynamo"])
def test_embedding_loads_and_the_rest_prunes(tmp_path: Path, exporter: str) -> None:
    if exporter == "dynamo" and not _has_onnxscript():
        pytest.skip("onnxscript is not installed")
    model, path = _Embed().eval(), tmp_path / f"emb_{exporter}.onnx"
    idx = torch.randint(0, 50, (2, 6))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(model, (idx,), str(path), dynamo=True, input_names=["idx"], output_names=["y"],
                              dynamic_shapes=({0: torch.export.Dim("N")},))
        else:
            torch.onnx.export(model, (idx,), str(path), dynamo=False, opset_version=17, input_names=["idx"], output_names=["y"],
                              dynamic_axes={"idx": {0: "N"}})
    g = load_onnx_model(path)
    lookup = [n for n in g.nodes if n.kind is OpKind.OPAQUE]
    assert len(lookup) == 1 and lookup[0].attrs["op_type"] == "Gather" and lookup[0].attrs["op"] == "embedding"
    assert [str(d) for d in lookup[0].outputs[0].shape] == ["N", "6", "16"] and lookup[0].outputs[0].dtype == "float32"
    assert not g.meta["warnings"]  # a lookup the interpreter evaluates (tests/test_embedding.py)
    (linear,) = g.prunable_params()  # the table stays dense, as with torch.fx
    assert linear.numel == 64 and "e.weight" not in {p.name for p in g.prunable_params()}

    from pai_compiler.frontends.torch.fx import lower_fx

    fx = lower_fx(_Embed().eval(), (idx,))
    assert [p.name for p in fx.prunable_params()] == ["fc.weight"]

    result = api.optimize(str(path), sparsity=0.5, method="magnitude")
    out = tmp_path / "pruned.onnx"
    api.save_model(result, path, out)
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    w = weights[linear.origin]  # Gemm's (out, in) or MatMul's (in, out)
    assert np.count_nonzero(w) == 32
    w = w.T if w.shape == (4, 16) else w
    feed = np.random.RandomState(4).randint(0, 50, (3, 6)).astype(np.int64)
    sess = session(out)
    got = sess.run(None, {sess.get_inputs()[0].name: feed})[0]
    expected = weights["e.weight"][feed] @ w + weights["fc.bias"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# ---- low-precision weights through Cast --------------------------------------------------------
def _cast_matmul(elem: int) -> tuple[onnx.ModelProto, np.ndarray]:
    w = np.random.RandomState(5).randn(16, 8).astype(np.float32)
    table = helper.make_tensor("Wq", elem, w.shape, [float(v) for v in w.reshape(-1)])
    nodes = [helper.make_node("Cast", ["Wq"], ["Wf"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["x", "Wf"], ["y"])]
    graph = helper.make_graph(nodes, "cast", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    return model, numpy_helper.to_array(table)


@pytest.mark.parametrize("elem", [TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN], ids=["bfloat16", "float8e4m3fn"])
def test_low_precision_weight_through_cast_is_pruned(tmp_path: Path, elem: int) -> None:
    model, stored = _cast_matmul(elem)
    src = tmp_path / "cast.onnx"
    onnx.save(model, str(src))
    g = import_onnx(model, "cast")
    assert [(p.name, p.origin) for p in g.prunable_params()] == [("Wq", "Wq")]
    result = api.optimize(str(src), sparsity=0.5, method="magnitude")
    out = tmp_path / "pruned.onnx"
    api.save_model(result, src, out)
    written = next(t for t in onnx.load(str(out)).graph.initializer if t.name == "Wq")
    assert written.data_type == elem
    masked = numpy_helper.to_array(written)
    keep = masked.astype(np.float32) != 0
    assert keep.sum() == 64
    np.testing.assert_array_equal(masked.astype(np.float32), np.where(keep, stored.astype(np.float32), 0))
    x = np.random.RandomState(6).randn(3, 16).astype(np.float32)
    expected = x @ masked.astype(np.float32)
    from onnx.reference import ReferenceEvaluator

    np.testing.assert_allclose(ReferenceEvaluator(str(out)).run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)
    if elem == TensorProto.BFLOAT16:  # onnxruntime's CPU Cast covers bfloat16
        np.testing.assert_allclose(session(out).run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("elem", [TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN])
def test_low_precision_weight_runs_through_the_interpreter(tmp_path: Path, elem: int) -> None:
    """The torch-side passes (synflow, the real-mode interpreter, the compact module) take it as float32."""
    import torch

    from pai_compiler.backends.torch_compact import compact_module
    from pai_compiler.interp import Interpreter

    model, stored = _cast_matmul(elem)
    src = tmp_path / "cast.onnx"
    onnx.save(model, str(src))
    result = api.optimize(str(src), sparsity=0.5, method="synflow")
    assert sum(int(m.sum()) for m in result.masks.values()) == 64
    x = torch.from_numpy(np.random.RandomState(2).randn(3, 16).astype(np.float32))
    expected = x.numpy() @ np.where(result.masks["Wq"], stored.astype(np.float32), 0)
    np.testing.assert_allclose(Interpreter(result.graph).run([x]).outputs[0].numpy(), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(compact_module(result.graph)(x).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_decomposed_layernorm_as_the_graph_output_fuses(tmp_path: Path) -> None:
    """The norm's last node feeds only the graph output (no affine, no cast after it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16, elementwise_affine=False)).eval()
    path = _export(model, tmp_path / "ln_out.onnx", "torchscript", 13)
    graph = load_onnx_model(path)
    assert "norm/layer" in _ops(graph)
    _assert_matches_ort(path, graph, np.random.RandomState(0).randn(3, 8).astype(np.float32))
