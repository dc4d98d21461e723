"""Position ids computed from the inputs (RoBERTa, OPT): real semantics, and the positions' lookup is a path source.

RoBERTa builds ``cumsum(ids != pad) * (ids != pad) + pad`` and gathers its token types by them;
OPT builds ``cumsum(mask) * mask - 1``. Through the torch route (export, and fx on a module
that spells the same arithmetic) those are index-data nodes the interpreter runs: the
lowered graph computes what the model computes, padded ids included, and the data-free
criteria (magnitude, synflow, dpai) take the integer input as lookup indices. Tiny configs
with random weights (``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from pai_compiler.api import optimize
from pai_compiler.frontends.onnx import load_onnx_model
from pai_compiler.frontends.torch.export import lower_export
from pai_compiler.frontends.torch.fx import lower_fx
from pai_compiler.frontends.torch.spec import lower_module
from pai_compiler.interp import Interpreter
from pai_compiler.interp_tables import indexes_lookups_only
from pai_compiler.ir import Graph, OpKind
from pai_compiler.passes.analysis.paths import ones_inputs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()

VOCAB, PAD = 128, 1


def _roberta() -> nn.Module:
    torch.manual_seed(0)
    return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=40, pad_token_id=PAD, num_labels=3)).eval()


def _opt() -> nn.Module:
    torch.manual_seed(0)
    return transformers.OPTModel(transformers.OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                                                        vocab_size=VOCAB, max_position_embeddings=40, word_embed_proj_dim=32)).eval()


def _ids(batch: int = 3, length: int = 8, padded: bool = False) -> torch.Tensor:
    ids = torch.randint(PAD + 1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))
    if padded:
        ids[1, length // 2 :] = PAD  # positions restart at pad for padding: the cumsum must be real
    return ids


def _no_unknown_opaque(graph: Graph) -> None:
    assert [n.name for n in graph.nodes if n.kind is OpKind.OPAQUE and n.attrs.get("op") is None] == []


def _density(graph: Graph) -> float:
    params = graph.prunable_params()
    return sum(p.kept() for p in params) / sum(p.numel for p in params)


def _expected(model: nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    extra: dict[str, Any] = {"use_cache": False} if "use_cache" in model.forward.__code__.co_varnames else {}
    with torch.no_grad():
        return model(**inputs, **extra)[0]


@pytest.fixture(scope="module")
def roberta_graph() -> Graph:
    graph = lower_module(_roberta(), {"input_ids": _ids()})
    assert graph.meta["frontend"] == "export"
    return graph


def test_roberta_positions_are_real_semantics(roberta_graph: Graph) -> None:
    _no_unknown_opaque(roberta_graph)
    assert {n.attrs["op"] for n in roberta_graph.nodes if n.kind is OpKind.OPAQUE} >= {"compare", "cumsum", "gather_elements"}
    assert indexes_lookups_only(roberta_graph.inputs[0])
    model = _roberta()
    for ids in (_ids(), _ids(padded=True), _ids(batch=2, padded=True)):
        got = Interpreter(roberta_graph).run([ids]).outputs[0]
        torch.testing.assert_close(got, _expected(model, input_ids=ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "synflow", "dpai"])
def test_roberta_takes_data_free_criteria(roberta_graph: Graph, method: str) -> None:
    result = optimize(roberta_graph.clone(), sparsity=0.8, method=method, steps=2 if method == "dpai" else None)
    assert _density(result.graph) == pytest.approx(0.2, abs=0.01)
    params = result.graph.prunable_params()
    assert sum(p.mask is not None and 0 < p.mask.sum() < p.mask.size for p in params) >= len(params) // 2


def test_positions_lookup_is_a_path_source(roberta_graph: Graph) -> None:
    """The position table's lookup starts paths (it is read through the ids), unlike a positional constant."""
    lookups = {n.name: n for n in roberta_graph.nodes if n.kind is OpKind.OPAQUE and n.attrs.get("op") == "embedding"}
    assert len(lookups) == 3 and not any(n.attrs.get("positional") for n in lookups.values())
    seen: dict[str, torch.Tensor] = {}
    it = Interpreter(roberta_graph, mode="paths", bind={"batch": 2})
    it.run(ones_inputs(roberta_graph, {"batch": 2}, torch.float32), on_node=lambda n, outs: seen.update({n.name: outs[0]}) if n.name in lookups else None)
    assert len(seen) == 3 and all(bool((t == 1).all()) for t in seen.values())


def test_opt_positions_from_the_ids() -> None:
    model = _opt()
    graph = lower_module(model, {"input_ids": _ids()})
    _no_unknown_opaque(graph)
    for ids in (_ids(), _ids(batch=2)):
        torch.testing.assert_close(Interpreter(graph).run([ids]).outputs[0], _expected(model, input_ids=ids), rtol=1e-4, atol=1e-5)
    assert _density(optimize(graph.clone(), sparsity=0.8, method="synflow").graph) == pytest.approx(0.2, abs=0.01)


class _Positions(nn.Module):
    """RoBERTa's ``create_position_ids_from_input_ids`` spelled for torch.fx (no data-dependent control flow)."""

    def __init__(self) -> None:
        super().__init__()
        self.words = nn.Embedding(VOCAB, 16, padding_idx=PAD)
        self.positions = nn.Embedding(40, 16, padding_idx=PAD)
        self.head = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids.ne(PAD).int()
        positions = (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + PAD
        return self.head(torch.relu(self.words(ids) + self.positions(positions)))


def test_fx_route_lowers_the_same_arithmetic() -> None:
    torch.manual_seed(0)
    model = _Positions().eval()
    graph = lower_fx(model, _ids())
    _no_unknown_opaque(graph)
    assert indexes_lookups_only(graph.inputs[0])
    ids = _ids(padded=True)
    with torch.no_grad():
        torch.testing.assert_close(Interpreter(graph).run([ids]).outputs[0], model(ids))
    assert _density(optimize(graph.clone(), sparsity=0.5, method="synflow").graph) == pytest.approx(0.5, abs=0.02)


def test_onnx_export_with_dynamic_positions(tmp_path: Path) -> None:
    """The TorchScript export with a dynamic sequence keeps Not/Equal/CumSum on the ids: the ONNX route runs them too."""
    path = tmp_path / "positions.onnx"
    torch.manual_seed(0)
    model = _Positions().eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (_ids(),), str(path), opset_version=17, dynamo=False, input_names=["ids"], output_names=["y"],
                          dynamic_axes={"ids": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}})
    graph = load_onnx_model(path)
    _no_unknown_opaque(graph)
    ids = _ids(batch=2, length=6, padded=True)
    with torch.no_grad():
        torch.testing.assert_close(Interpreter(graph).run([ids]).outputs[0], model(ids), rtol=1e-5, atol=1e-6)
    assert _density(optimize(graph.clone(), sparsity=0.5, method="synflow").graph) == pytest.approx(0.5, abs=0.02)


class _Hidden(nn.Module):
    """``model(ids)[0]``: one tensor in and out for the exporters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)[0]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-dynamic", "dynamo-dynamic"])
def test_roberta_dynamic_onnx_export_runs_its_positions(tmp_path: Path, dynamo: bool) -> None:
    """A dynamic batch and sequence keep RoBERTa's position arithmetic in the file (CumSum, Not/Equal, ...)."""
    model = _Hidden(_roberta()).eval()
    path = tmp_path / "roberta.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            dims = {0: torch.export.Dim("batch", min=2), 1: torch.export.Dim("seq", min=2)}
            torch.onnx.export(model, (_ids(),), str(path), dynamo=True, dynamic_shapes=(dims,), verbose=False)
        else:
            torch.onnx.export(model, (_ids(),), str(path), opset_version=17, dynamo=False, input_names=["ids"], output_names=["y"],
                              dynamic_axes={"ids": {0: "batch", 1: "seq"}, "y": {0: "batch"}})
    graph = load_onnx_model(path)
    _no_unknown_opaque(graph)
    ids = _ids(batch=2, length=6, padded=True)
    with torch.no_grad():
        torch.testing.assert_close(Interpreter(graph).run([ids]).outputs[0], model(ids), rtol=1e-4, atol=1e-5)
    assert _density(optimize(graph.clone(), sparsity=0.8, method="synflow").graph) == pytest.approx(0.2, abs=0.01)


class _MaskLogic(nn.Module):
    """``|``, ``~`` and comparisons on bool masks are logical; on integers they are bitwise and stay opaque."""

    def __init__(self, bitwise_ints: bool) -> None:
        super().__init__()
        self.words = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, 3)
        self.bitwise_ints = bitwise_ints

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = (ids.ne(PAD) | ids.eq(5)) & ~ids.gt(100)
        picked = ids | 3 if self.bitwise_ints else ids
        return self.head(self.words(picked) * keep.unsqueeze(-1).float())


@pytest.mark.parametrize("lower", [lower_fx, lower_export], ids=["fx", "export"])
def test_bool_logic_is_real_and_integer_bitwise_is_opaque(lower: Any) -> None:
    torch.manual_seed(0)
    model = _MaskLogic(bitwise_ints=False).eval()
    graph = lower(model, _ids())
    _no_unknown_opaque(graph)
    ids = _ids(padded=True)
    ids[0, 0] = 101
    with torch.no_grad():
        torch.testing.assert_close(Interpreter(graph).run([ids]).outputs[0], model(ids))
    bitwise = lower(_MaskLogic(bitwise_ints=True).eval(), _ids())
    assert [n.attrs.get("reason") for n in bitwise.nodes if n.kind is OpKind.OPAQUE and n.attrs.get("op") is None] == ["bitwise op on integers"]
