"""Decoder-only sequence classifiers pool their last non-pad token (GPT-2, Llama ``...ForSequenceClassification``):

``last = (arange(seq) * (ids != pad)).argmax(-1); pooled = logits[arange(batch), last]``. The argmax is
index data (``op="arg_reduce"``; ONNX ArgMax), the per-sample pick a gather on axis 1, and the ids feed
both the embedding and the pick, which SynFlow accepts. Checked against the torch model and
onnxruntime, at batches other than the example's, with padded samples.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from pai_compiler.api import optimize
from pai_compiler.frontends.onnx import load_onnx_model
from pai_compiler.frontends.torch.spec import lower_module
from pai_compiler.interp import Interpreter
from pai_compiler.ort import session

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()

VOCAB, PAD = 64, 0
FAMILIES = {
    "gpt2": lambda: transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        n_embd=16, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=32, pad_token_id=PAD, num_labels=3)),
    "llama": lambda: transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
        max_position_embeddings=32, pad_token_id=PAD, num_labels=3, attn_implementation="eager")),
}


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return FAMILIES[family]().eval()


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[0, length - 3:] = PAD  # right padding: this sample pools an earlier token
    return ids


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_torch_route_pools_the_last_non_pad_token(family: str) -> None:
    model = _model(family)
    g = lower_module(model, {"input_ids": _ids(2, 8)})
    assert not [n.name for n in g.nodes if n.attrs.get("reason")]
    for batch, length in ((2, 8), (3, 8)):
        ids = _ids(batch, length, seed=batch)
        torch.testing.assert_close(Interpreter(g).run([ids]).outputs[0], _logits(model, ids), rtol=1e-4, atol=1e-6)
    result = optimize(g, sparsity=0.8, method="synflow")
    assert all(p.mask is not None for p in result.graph.prunable_params())


class _Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def test_onnx_route_argmax_and_pick_equal_onnxruntime(tmp_path: Path) -> None:
    path = tmp_path / "gpt2_cls.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(_model("gpt2")).eval(), (_ids(2, 8),), str(path), dynamo=False, opset_version=17,
                          input_names=["ids"], output_names=["logits"], dynamic_axes={"ids": {0: "batch", 1: "seq"}})
    g = load_onnx_model(path)
    assert any(n.attrs.get("op") == "arg_reduce" for n in g.nodes)
    sess = session(path, threads=1)
    for batch, length in ((2, 8), (3, 6)):
        ids = _ids(batch, length, seed=batch)
        ref = sess.run(None, {"ids": ids.numpy()})[0]
        np.testing.assert_allclose(Interpreter(g).run([ids]).outputs[0].numpy(), ref, rtol=1e-4, atol=1e-6)
    result = optimize(g, sparsity=0.8, method="synflow")
    assert all(p.mask is not None for p in result.graph.prunable_params())


def test_arg_reduce_equals_torch_and_numpy() -> None:
    """First of equal values (torch, numpy, ONNX's default); ``select_last_index`` the last; keepdims."""
    from types import SimpleNamespace

    from pai_compiler.interp_index_rules import arg_reduce

    x = torch.tensor([[3, 1, 3, 0], [0, 2, 2, -1], [5, 5, 5, 5]])
    for fn, axis, keep, last in ((f, a, k, l) for f in ("max", "min") for a in (0, 1, -1) for k in (True, False) for l in (False, True)):
        node = SimpleNamespace(attrs={"op": "arg_reduce", "fn": fn, "axis": axis, "keepdims": keep, "select_last_index": last})
        got = arg_reduce(None, node, [x])[0]  # type: ignore[arg-type]
        a = x.numpy()
        pick = np.argmax if fn == "max" else np.argmin
        want = (a.shape[axis] - 1 - pick(np.flip(a, axis), axis=axis)) if last else pick(a, axis=axis)
        want = np.expand_dims(want, axis) if keep else want
        np.testing.assert_array_equal(got.numpy(), want)


def test_onnx_argmax_of_activations_stays_opaque(tmp_path: Path) -> None:
    """An ArgMax of float logits carries no paths: no rule (as on the torch route), named in the warnings."""
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).reshape(-1).tolist())
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("ArgMax", ["h"], ["y"], axis=1, keepdims=0, name="pick")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [2])], [w])
    path = tmp_path / "argmax.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    g = load_onnx_model(path)
    node = next(n for n in g.nodes if n.name == "pick")
    assert node.attrs.get("reason") and node.attrs.get("op") != "arg_reduce"
    assert any("'pick'" in w and "floats" in w for w in g.meta["warnings"])
