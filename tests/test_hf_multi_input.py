"""Hugging Face models with several inputs: data-driven criteria feed every input, through both routes.

BERT with ``input_ids`` + ``attention_mask`` (a dict example through the torch route, and an
ONNX export with both inputs through the CLI): ``--data random`` draws valid token ids for
the embedding input and all-ones masks for the mask, and SNIP/GraSP run on both.
Tiny configs with random weights (``HF_HUB_OFFLINE=1``: nothing is downloaded).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from onnx import numpy_helper
from torch import nn
from typer.testing import CliRunner

from pai_compiler.api import optimize, save_model
from pai_compiler.audit import audit_graph
from pai_compiler.backends.index_inputs import input_roles
from pai_compiler.backends.sparse_timing import example_inputs
from pai_compiler.cli import app
from pai_compiler.errors import UsageError
from pai_compiler.frontends.onnx import load_onnx_model
from pai_compiler.frontends.torch.spec import lower_module
from pai_compiler.interp import Interpreter
from pai_compiler.ir import Graph
from pai_compiler.lab.data import load_batch_for

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()

VOCAB = 128


def _bert() -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                                          vocab_size=VOCAB, max_position_embeddings=32)).eval()


def _tokens(batch: int = 3, length: int = 8) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


class _TwoTensors(nn.Module):
    """``model(input_ids, attention_mask).last_hidden_state``: two positional tensors for the exporter."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf2") / "bert2.onnx"
    inputs = _tokens()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_TwoTensors(_bert()), (inputs["input_ids"], inputs["attention_mask"]), str(path), opset_version=17, dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["y"],
                          dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "y": {0: "batch"}})
    return path


def _check_random_batch(graph: Graph) -> None:
    roles = {r.name: r for r in input_roles(graph)}
    assert roles["input_ids"].kind == "indices" and roles["input_ids"].entries == VOCAB
    assert roles["attention_mask"].kind == "mask"
    batch = load_batch_for(graph, "random", samples_per_class=1, seed=0)
    assert list(batch.more) == ["attention_mask"]
    assert batch.x.dtype == np.int64 and 0 <= batch.x.min() and batch.x.max() < VOCAB and len(np.unique(batch.x)) > 10
    assert batch.more["attention_mask"].shape == batch.x.shape and bool((batch.more["attention_mask"] == 1).all())


def _density(graph: Graph) -> float:
    params = graph.prunable_params()
    return sum(p.kept() for p in params) / sum(p.numel for p in params)


@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_data_criteria_feed_both_inputs_through_the_torch_route(method: str) -> None:
    graph = lower_module(_bert(), _tokens())
    assert [v.name for v in graph.inputs] == ["input_ids", "attention_mask"]
    _check_random_batch(graph)
    batch = load_batch_for(graph, "random", samples_per_class=1, seed=0)
    result = optimize(graph.clone(), sparsity=0.8, method=method, data=batch)
    assert _density(result.graph) == pytest.approx(0.2, abs=0.01)
    # the mask is fed, not ignored: a batch that pads half of every sample scores differently
    padded = type(batch)(batch.x, batch.y, batch.meta, {"attention_mask": np.concatenate(
        [np.ones((len(batch), 4), np.int64), np.zeros((len(batch), 4), np.int64)], axis=1)})
    other = optimize(graph.clone(), sparsity=0.8, method=method, data=padded)
    masks = {p.name: p.mask for p in result.graph.prunable_params()}
    assert any(not np.array_equal(masks[p.name], p.mask) for p in other.graph.prunable_params())


@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_data_criteria_on_a_two_input_onnx_export(bert_onnx: Path, tmp_path: Path, method: str) -> None:
    _check_random_batch(load_onnx_model(bert_onnx))
    out, report = tmp_path / "pruned.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(app, ["optimize", str(bert_onnx), "-m", method, "--sparsity", "0.8", "--data", "random", "--samples", "1",
                                   "-o", str(out), "--report", str(report)])
    assert res.exit_code == 0, res.output
    assert out.exists()
    assert json.loads(report.read_text())["after"]["density"] == pytest.approx(0.2, abs=0.01)


def test_a_data_file_feeds_only_the_first_input(tmp_path: Path) -> None:
    """A file's x_train is the first input: an all-ones mask is filled in, any other input is refused by name."""
    graph = lower_module(_bert(), _tokens())
    data = tmp_path / "ids.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x_train=rng.integers(0, VOCAB, (64, 8)), y_train=np.arange(64) % 32)
    batch = load_batch_for(graph, data, samples_per_class=1)
    assert batch.more["attention_mask"].shape == (32, 8) and bool((batch.more["attention_mask"] == 1).all())
    model = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                                           vocab_size=VOCAB, max_position_embeddings=32, type_vocab_size=4)).eval()
    inputs = {**_tokens(), "token_type_ids": torch.zeros(3, 8, dtype=torch.long)}
    three = lower_module(model, inputs)
    with pytest.raises(UsageError, match="'token_type_ids'.*--data random"):
        load_batch_for(three, data, samples_per_class=1)
    random = load_batch_for(three, "random", samples_per_class=1)
    assert random.more["token_type_ids"].max() < 4 and random.more["token_type_ids"].max() > 0


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=32,
                                                                bos_token_id=0, eos_token_id=0)).eval()


@pytest.mark.parametrize("factory,inputs", [(_bert, _tokens()), (_gpt2, {"input_ids": _tokens()["input_ids"]})], ids=["bert-two-inputs", "gpt2-use-cache"])
def test_onnx_from_an_hf_torch_model_takes_the_named_inputs(tmp_path: Path, factory: object, inputs: dict[str, torch.Tensor]) -> None:
    """``-o X.onnx`` from a Hugging Face module: the graph's named inputs, by keyword, no cache; ORT computes the masked model."""
    graph = lower_module(factory(), inputs)  # type: ignore[operator]
    result = optimize(graph, sparsity=0.8, method="magnitude")
    out = tmp_path / "pruned.onnx"
    save_model(result, "spec.py:model", out)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(inputs)
    feeds = {name: t[:2].numpy() for name, t in inputs.items()}  # another batch size than the example: the batch axis is dynamic
    got = session.run(None, feeds)
    expected = Interpreter(result.graph).run([t[:2] for t in inputs.values()]).outputs
    np.testing.assert_allclose(got[0], expected[0].numpy(), rtol=1e-4, atol=1e-5)
    weights = {init.name: numpy_helper.to_array(init) for init in onnx.load(str(out)).graph.initializer}
    pruned = [p for p in result.graph.prunable_params() if p.mask is not None and p.origin in weights]
    assert pruned, "initializers keep the module's own FQNs (no wrapper prefix)"
    assert all(float((weights[p.origin] == 0).mean()) > 0.5 for p in pruned)


@pytest.mark.parametrize("method", ["synflow", "dpai"])
def test_data_free_criteria_take_a_mask_input(bert_onnx: Path, method: str) -> None:
    """SynFlow and DPaI feed all ones: the attention mask then attends everything (it picks no embedding row)."""
    for graph in (lower_module(_bert(), _tokens()), load_onnx_model(bert_onnx)):
        result = optimize(graph, sparsity=0.8, method=method, steps=2 if method == "dpai" else None)
        assert _density(result.graph) == pytest.approx(0.2, abs=0.01)


def test_sparse_module_of_a_static_two_input_export_matches_onnxruntime(tmp_path: Path) -> None:
    """At a static batch the exporter folds two embedding ``Add``s into constants (token types at
    (batch, seq, hidden), positions at (1, seq, hidden)): each is its own Param under its own
    name, so the sparse module (tensors keyed by name) runs each with its own tensor. Its build
    check feeds an all-ones mask; a padded mask agrees with onnxruntime too."""
    path, fast = tmp_path / "static.onnx", tmp_path / "fast.pt"
    inputs = _tokens()  # sample 1 padded
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_TwoTensors(_bert()), (inputs["input_ids"], inputs["attention_mask"]), str(path), opset_version=17, dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["y"])
    graph = load_onnx_model(path)
    names = [p.name for p in graph.params()]
    assert len(names) == len(set(names)), "two distinct params share a name"
    ids, mask = example_inputs(graph, batch=3)
    entries = input_roles(graph)[0].entries
    assert entries is not None and 0 <= int(ids.min()) and int(ids.max()) < entries, "valid embedding rows"
    assert bool(mask.all()), "the build check attends every token (an all-zero mask hides them all)"
    res = CliRunner().invoke(app, ["compact", str(path), "-o", str(fast), "--batch", "3"])
    assert res.exit_code == 0, res.output
    feed = {k: v.numpy() for k, v in inputs.items()}
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    with torch.no_grad():
        got = torch.load(fast, weights_only=False)(*[torch.from_numpy(v) for v in feed.values()])
    got = (got[0] if isinstance(got, (list, tuple)) else got).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_a_dynamo_two_input_export_indexes_the_mask_by_gather_nd(tmp_path: Path) -> None:
    """The dynamo exporter reads the padding mask as ``mask[batch_idx, kv_idx]`` (GatherND with constant
    indices): the interpreter runs it, so the lowered graph computes what onnxruntime does on a padded
    batch, and the audit counts paths (before: an opaque GatherND, paths null, no compact .pt)."""
    path = tmp_path / "dynamo.onnx"
    inputs = _tokens()  # sample 1 padded
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_TwoTensors(_bert()), (inputs["input_ids"], inputs["attention_mask"]), str(path), dynamo=True, verbose=False,
                          input_names=["input_ids", "attention_mask"])
    assert any(n.op_type == "GatherND" for n in onnx.load(str(path)).graph.node), "the export no longer has the pattern under test"
    graph = load_onnx_model(path)
    assert any(n.attrs.get("op") == "gather_nd" for n in graph.nodes)
    feed = {k: v.numpy() for k, v in inputs.items()}
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = Interpreter(graph).run([torch.from_numpy(v) for v in feed.values()]).outputs[0].detach().numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert audit_graph(graph)["totals"]["log_paths"] is not None
