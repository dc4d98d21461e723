"""Both routes, one path count: a model lowered from torch and from its ONNX export gets the same audit.

The semantics they share (README, path section): integer/bool values (token ids, positions, masks)
carry no paths, so a float computed from them alone, such as an attention mask turned into an
additive bias (``mask * -1e4``, the torch frontend's fused-SDPA spelling) is a data constant with
zero paths, exactly like ONNX's ``Where(mask, 0, -inf)``; and an activation spelled out of
primitives (GPT-2's ``gelu_new``) is one node in both routes (its ``Mul`` would otherwise gate-sum
counts). Checked on hand-built graphs against brute-force enumeration (``tests/test_node_path``),
and on tiny random-weight BERT (with an ``attention_mask`` input) and GPT-2 through both routes.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from torch import nn

from pai_compiler.audit import audit_graph
from pai_compiler.frontends.onnx import load_onnx_model
from pai_compiler.frontends.torch.spec import lower_module
from pai_compiler.ir import Graph, GraphBuilder, OpKind, Param, Value
from tests.test_node_path import analyse, brute_force, check_against_brute_force, sparse

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()

VOCAB = 100


# ---- hand-built: a masked attention, the mask as an additive bias or as a Where ---------------

def _index_node(b: GraphBuilder, kind: OpKind, inputs: list[Value], shape: tuple[int, ...], dtype: str, **params_attrs: object) -> Value:
    params = params_attrs.pop("params", None)
    node = b.graph.add_node(kind, b.fresh(kind.value), inputs, [(b.fresh("v"), shape, dtype)], params=params, attrs=params_attrs)  # type: ignore[arg-type]
    return node.outputs[0]


def _masked_attention(spelling: str, seed: int = 3) -> Graph:
    """x -> q, k, v (sparse linears); softmax(q k^T + bias(mask)) v -> sparse linear; ``mask`` an int64 input."""
    rng = np.random.RandomState(seed)
    b = GraphBuilder()
    x = b.input((1, 3, 2))
    mask = _index_node(b, OpKind.INPUT, [], (1, 3, 3), "int64")
    q = sparse(b, b.linear(x, 2), 0.6, rng)
    k = sparse(b, b.linear(x, 2, transposed=True), 0.6, rng)
    scores = b.matmul(q, b.transpose(k, [0, 2, 1]))
    keep = _index_node(b, OpKind.POINTWISE, [mask], (1, 3, 3), "bool", op="cast", to="bool")
    if spelling == "bias":  # torch frontend: (mask * 1e4) - 1e4
        scaled = _index_node(b, OpKind.POINTWISE, [keep], (1, 3, 3), "float32", op="mul", const_first=False,
                             params={"const": Param("scale", np.array(1e4, np.float32), prunable=False)})
        bias = b.op(OpKind.POINTWISE, [scaled], (1, 3, 3), attrs={"op": "sub", "const_first": False},
                    params={"const": Param("offset", np.array(1e4, np.float32), prunable=False)})
    else:  # ONNX exporters: Where(mask, 0, -1e4)
        zero, low = (b.op(OpKind.CONSTANT, [], (1,), params={"value": Param(n, np.array([v], np.float32), prunable=False)})
                     for n, v in (("zero", 0.0), ("low", -1e4)))
        bias = b.op(OpKind.OPAQUE, [keep, zero, low], (1, 3, 3), attrs={"op": "where", "op_type": "Where"})
    att = b.softmax(b.add(scores, bias))
    v = sparse(b, b.linear(x, 3, transposed=True), 0.6, rng)
    return b.build(sparse(b, b.linear(b.matmul(att, v), 2, transposed=True), 0.5, rng))


def test_mask_bias_carries_no_paths_against_brute_force() -> None:
    g = _masked_attention("bias")
    check_against_brute_force(g)  # paths start at the float input only
    count, _ = brute_force(g)
    assert count > 0


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_mask_as_bias_and_as_where_count_the_same(seed: int) -> None:
    bias, where = analyse(_masked_attention("bias", seed)), analyse(_masked_attention("where", seed))
    assert bias.log_paths == pytest.approx(where.log_paths, abs=1e-12) and math.isfinite(bias.log_paths)
    assert [r.effective_kernels for r in bias.layers] == [r.effective_kernels for r in where.layers]


# ---- a spelled-out activation through the torch frontend --------------------------------------

class _NewGelu(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # GPT-2's gelu_new, spelled out
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_torch_frontend_fuses_a_spelled_out_gelu(frontend: str) -> None:
    torch.manual_seed(0)
    spelled = nn.Sequential(nn.Linear(4, 6), _NewGelu(), nn.Linear(6, 3)).eval()
    plain = nn.Sequential(spelled[0], nn.GELU(approximate="tanh"), spelled[2]).eval()
    x = torch.randn(2, 4)
    graphs = [lower_module(m, (x,), frontend) for m in (spelled, plain)]
    kinds = [[(n.kind, n.attrs.get("op")) for n in g.nodes if n.kind in (OpKind.POINTWISE, OpKind.MUL, OpKind.ADD)] for g in graphs]
    assert kinds[0] == kinds[1] == [(OpKind.POINTWISE, "gelu")]
    assert analyse(graphs[0]).log_paths == pytest.approx(math.log(4 * 6 * 3 * 1), abs=1e-12)  # one sample, dense


# ---- tiny Hugging Face models through both routes ---------------------------------------------

def _bert() -> nn.Module:
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=32, num_labels=3))


def _gpt2() -> nn.Module:
    return transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32))


class _Positional(nn.Module):
    """``model(**dict(zip(names, args)))`` -> its first tensor: what the ONNX exporter takes."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, args)))
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _routes(factory: object, tmp_path: Path) -> tuple[Graph, Graph]:
    torch.manual_seed(0)
    model = factory().eval()  # type: ignore[operator]
    ids = torch.randint(2, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Positional(model, list(inputs)), tuple(inputs.values()), str(path), dynamo=False, opset_version=17,
                          input_names=list(inputs), output_names=["y"])
    return lower_module(model, inputs), load_onnx_model(path)


@pytest.mark.parametrize("factory", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_torch_and_onnx_routes_audit_the_same(factory: object, tmp_path: Path) -> None:
    torch_graph, onnx_graph = _routes(factory, tmp_path)
    for g in (torch_graph, onnx_graph):  # the same random 50 % masks on both: the weights' order is the module's
        rng = np.random.RandomState(0)
        for p in g.prunable_params():
            g.set_mask(p, rng.rand(*p.shape) < 0.5 if p.out_axis == 0 else (rng.rand(*p.shape[::-1]) < 0.5).T)
    docs = [audit_graph(g) for g in (torch_graph, onnx_graph)]
    keys = ("log_paths", "effective_params", "effective_nodes", "effective_kernels", "params", "nonzero_params")
    assert {k: docs[0]["totals"][k] for k in keys} == pytest.approx({k: docs[1]["totals"][k] for k in keys}, rel=1e-12)
    assert [(r["effective_nodes"], r["effective_kernels"]) for r in docs[0]["layers"]] == \
        [(r["effective_nodes"], r["effective_kernels"]) for r in docs[1]["layers"]]


def _pixels_model(path: Path, dtype: int) -> Path:
    """x[1,3,6,6] (uint8 pixels cast to float, or float) -> conv 3x3 -> relu -> flatten -> matmul."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((144, 5)).astype(np.float32), "fc"),
             numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "shape")]
    first = helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT) if dtype != TensorProto.FLOAT else helper.make_node("Identity", ["x"], ["xf"])
    nodes = [first, helper.make_node("Conv", ["xf", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["f"]), helper.make_node("MatMul", ["f", "fc"], ["y"])]
    graph = helper.make_graph(nodes, "pixels", [helper.make_tensor_value_info("x", dtype, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_integer_pixels_cast_to_float_carry_paths(tmp_path: Path) -> None:
    # an integer input cast to float is data entering the network, not a mask: same counts as a float input
    from onnx import TensorProto

    pixels = audit_graph(load_onnx_model(_pixels_model(tmp_path / "u8.onnx", TensorProto.UINT8)))["totals"]
    floats = audit_graph(load_onnx_model(_pixels_model(tmp_path / "f32.onnx", TensorProto.FLOAT)))["totals"]
    assert pixels["log_paths"] is not None and math.isfinite(pixels["log_paths"])
    assert (pixels["log_paths"], pixels["effective_nodes"]) == (floats["log_paths"], floats["effective_nodes"])
