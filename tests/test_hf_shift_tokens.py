"""BART-family decoder inputs built from the ids (``shift_tokens_right``): real semantics through both frontends.

``shifted = ids.new_zeros(ids.shape); shifted[:, 1:] = ids[:, :-1]; shifted[:, 0] = start;
shifted.masked_fill_(shifted == -100, pad)`` (mBART: the last non-pad token wraps to the front)
is a slice assignment: torch.export functionalizes it (``slice_scatter``/``select_scatter``,
lowered as concats), the ONNX exporters write ScatterND/ScatterElements (interpreter rules). Each
check is against an independent computation: the torch model, onnxruntime, or a numpy loop.
Tiny configs with random weights (``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers
from onnx import TensorProto, helper
from torch import nn

from pai_compiler.api import optimize
from pai_compiler.frontends.onnx import load_onnx_model
from pai_compiler.frontends.torch.export import lower_export
from pai_compiler.frontends.torch.spec import lower_module
from pai_compiler.interp import Interpreter
from pai_compiler.interp_tables import indexes_lookups_only
from pai_compiler.ir import Graph, OpKind

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()

VOCAB, PAD = 96, 1
_SIZES = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
              encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=VOCAB, max_position_embeddings=32, pad_token_id=PAD)
FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "bart": lambda: transformers.BartModel(transformers.BartConfig(**_SIZES)),
    "mbart": lambda: transformers.MBartModel(transformers.MBartConfig(**_SIZES)),
}


def _model(family: str) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[family]().eval()


def _ids(batch: int = 2, length: int = 8, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(PAD + 2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[0, length - 2:] = PAD  # padding: mBART's wrapped token is the last non-pad one
    return ids


def _expected(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False)[0]


def _no_unknown_opaque(graph: Graph) -> None:
    assert [n.name for n in graph.nodes if n.kind is OpKind.OPAQUE and n.attrs.get("op") is None] == []


def _density(graph: Graph) -> float:
    params = graph.prunable_params()
    return sum(p.kept() for p in params) / sum(p.numel for p in params)


# ---- the rules on their own ----------------------------------------------------------------
def _scatter_nd_reference(data: np.ndarray, indices: np.ndarray, updates: np.ndarray, reduction: str) -> np.ndarray:
    """ONNX's ScatterND, one index tuple at a time."""
    out = data.copy()
    for j in np.ndindex(indices.shape[:-1]):
        at = tuple(int(i) for i in indices[j])
        out[at] = out[at] + updates[j] if reduction == "add" else updates[j]
    return out


def _scatter_model(op: str, data_shape: list[int], index_shape: list[int], dtype: int, opset: int = 18, **attrs: object) -> onnx.ModelProto:
    node = helper.make_node(op, ["data", "indices", "updates"], ["y"], **attrs)
    update_shape = index_shape if op != "ScatterND" else index_shape[:-1] + data_shape[index_shape[-1]:]
    graph = helper.make_graph([node], "scatter", [helper.make_tensor_value_info("data", dtype, data_shape),
                                                   helper.make_tensor_value_info("indices", TensorProto.INT64, index_shape),
                                                   helper.make_tensor_value_info("updates", dtype, update_shape)],
                              [helper.make_tensor_value_info("y", dtype, data_shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("reduction", ["none", "add"])
@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.INT64], ids=["float", "int64"])
def test_scatter_nd_matches_numpy(tmp_path: Path, reduction: str, dtype: int) -> None:
    """Index tuples addressing the first two of three axes (negative ones count from the end), both modes alike."""
    rng = np.random.default_rng(0)
    data_shape, index_shape = [4, 5, 3], [2, 3, 2]
    flat = rng.permutation(20)[:6] if reduction == "none" else rng.integers(0, 20, 6)  # "none": distinct targets
    indices = np.stack(np.unravel_index(flat, (4, 5)), -1).reshape(index_shape).astype(np.int64)
    indices[0, 0] -= np.array([4, 5])  # the same positions, counted from the end
    np_dtype = np.float32 if dtype == TensorProto.FLOAT else np.int64
    data, updates = (rng.normal(size=s).astype(np_dtype) * 10 for s in (data_shape, index_shape[:-1] + [3]))
    path = tmp_path / "scatter_nd.onnx"
    onnx.save(_scatter_model("ScatterND", data_shape, index_shape, dtype, reduction=reduction), path)
    graph = load_onnx_model(path)
    _no_unknown_opaque(graph)
    expected = _scatter_nd_reference(data, indices % np.array([4, 5]), updates, reduction)
    feeds = [torch.from_numpy(a) for a in (data, indices, updates)]
    for mode in ("real", "paths"):
        got = Interpreter(graph, mode=mode, dtype=torch.float64).run(feeds).outputs[0]
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("op,opset", [("ScatterElements", 18), ("Scatter", 10)])
def test_scatter_elements_matches_numpy(tmp_path: Path, op: str, opset: int) -> None:
    """Along axis 1 (opset 9/10's Scatter is ScatterElements under its old name, its axis included)."""
    rng = np.random.default_rng(1)
    data = rng.normal(size=(3, 6)).astype(np.float32)
    indices = np.stack([rng.permutation(6)[:4] for _ in range(3)]).astype(np.int64)
    indices[1, 0] -= 6
    updates = rng.normal(size=(3, 4)).astype(np.float32)
    path = tmp_path / "scatter_elements.onnx"
    onnx.save(_scatter_model(op, [3, 6], [3, 4], TensorProto.FLOAT, opset, axis=1), path)
    graph = load_onnx_model(path)
    _no_unknown_opaque(graph)
    expected = data.copy()
    for i, j in np.ndindex(indices.shape):
        expected[i, indices[i, j] % 6] = updates[i, j]
    got = Interpreter(graph).run([torch.from_numpy(a) for a in (data, indices, updates)]).outputs[0]
    np.testing.assert_allclose(got.numpy(), expected)


class _Assignments(nn.Module):
    """``new_zeros``/``new_full``, slice and index assignment, ``masked_fill_``: what BART-family code does to its ids."""

    def __init__(self) -> None:
        super().__init__()
        self.words = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        shifted = ids.new_zeros(ids.shape)
        shifted[:, 2:] = ids[:, :-2]
        shifted[:, 0] = 7
        shifted[:, 1] = ids[:, -1]  # a run-time value into one column
        shifted.masked_fill_(shifted == 5, PAD)
        filled = ids.new_full((ids.shape[0], 2), 3)
        filled[:, 1:] = shifted[:, :1]
        return self.head(torch.relu(self.words(torch.cat([shifted, filled], dim=1))))


def test_new_zeros_and_slice_assignment_match_torch() -> None:
    torch.manual_seed(0)
    model = _Assignments().eval()
    graph = lower_export(model, _ids())
    _no_unknown_opaque(graph)
    assert indexes_lookups_only(graph.inputs[0])
    for ids in (_ids(), _ids(batch=3, seed=2)):
        ids[-1, 3] = 5  # masked_fill_ must see it
        with torch.no_grad():
            torch.testing.assert_close(Interpreter(graph).run([ids]).outputs[0], model(ids))


# ---- the models --------------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(FAMILIES))
def torch_route(request: pytest.FixtureRequest) -> tuple[str, Graph]:
    return request.param, lower_module(_model(request.param), {"input_ids": _ids()})


def test_torch_route_computes_what_the_model_computes(torch_route: tuple[str, Graph]) -> None:
    family, graph = torch_route
    _no_unknown_opaque(graph)
    model = _model(family)
    for ids in (_ids(), _ids(batch=3, seed=2)):
        torch.testing.assert_close(Interpreter(graph).run([ids]).outputs[0], _expected(model, ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["synflow", "dpai", "npb"])
def test_torch_route_takes_the_criteria(torch_route: tuple[str, Graph], method: str) -> None:
    _, graph = torch_route
    result = optimize(graph.clone(), sparsity=0.8, method=method, steps=2 if method == "dpai" else None)
    assert _density(result.graph) == pytest.approx(0.2, abs=0.01)


class _Hidden(nn.Module):
    """``model(ids)[0]``: one tensor in and out for the exporters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, use_cache=False)[0]


def _export(family: str, exporter: str, path: Path) -> nn.Module:
    model = _Hidden(_model(family)).eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(model, (_ids(),), str(path), dynamo=True, verbose=False)
        else:
            dynamic = {"ids": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}} if exporter == "torchscript-dynamic" else None
            torch.onnx.export(model, (_ids(),), str(path), opset_version=17, dynamo=False, input_names=["ids"], output_names=["y"],
                              dynamic_axes=dynamic)
    return model


@pytest.mark.parametrize("family, exporter", [("bart", "torchscript-dynamic"), ("bart", "dynamo"), ("mbart", "torchscript")])
def test_onnx_route_runs_the_scatters(tmp_path: Path, family: str, exporter: str) -> None:
    """ScatterND (TorchScript; sized by the bound batch and sequence when dynamic), ScatterElements
    (dynamo): the interpreter matches the model, and the forward-pass criteria run."""
    path = tmp_path / f"{family}.onnx"
    model = _export(family, exporter, path)
    graph = load_onnx_model(path)
    _no_unknown_opaque(graph)
    assert {n.attrs["op"] for n in graph.nodes if n.kind is OpKind.OPAQUE} & {"scatter_nd", "scatter_elements"}
    for ids in [_ids()] + ([_ids(batch=3, length=6, seed=2)] if exporter.endswith("dynamic") else []):
        with torch.no_grad():
            torch.testing.assert_close(Interpreter(graph).run([ids]).outputs[0], model(ids), rtol=1e-4, atol=1e-5)
    for method in ("synflow", "dpai"):
        result = optimize(graph.clone(), sparsity=0.8, method=method, steps=2 if method == "dpai" else None)
        assert _density(result.graph) == pytest.approx(0.2, abs=0.01)
