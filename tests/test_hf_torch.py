"""Hugging Face models through the PyTorch route: lowering as they are, every criterion, tied heads, CLI inputs.

Tiny configs with random weights (``HF_HUB_OFFLINE=1``: nothing is downloaded). The lowered
graph is checked against the model itself (every tensor of its output), each criterion runs
on BERT, GPT-2 and ViT, and a tied LM head gets the same decision through fx and export.
"""
from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn
from typer.testing import CliRunner

import pai_compiler
from pai_compiler.api import optimize
from pai_compiler.cli import app
from pai_compiler.errors import ModelError
from pai_compiler.frontends.torch.export import lower_export
from pai_compiler.frontends.torch.fx import lower_fx
from pai_compiler.frontends.torch.spec import lower_module
from pai_compiler.interp import Interpreter
from pai_compiler.interp_tables import rule_for
from pai_compiler.lab.data import load_batch_for

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()

VOCAB = 128


def _bert() -> nn.Module:
    return transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                                          vocab_size=VOCAB, max_position_embeddings=32))


def _gpt2() -> nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=32,
                                                                bos_token_id=0, eos_token_id=0))


def _vit() -> nn.Module:
    return transformers.ViTForImageClassification(transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                                         num_attention_heads=2, intermediate_size=64, num_labels=5))


def _t5() -> nn.Module:
    return transformers.T5EncoderModel(transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=VOCAB))


def _distilbert() -> nn.Module:
    return transformers.DistilBertModel(transformers.DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=VOCAB,
                                                                      max_position_embeddings=32))


def _swin() -> nn.Module:
    return transformers.SwinForImageClassification(transformers.SwinConfig(image_size=16, patch_size=2, embed_dim=8, depths=[1, 1],
                                                                           num_heads=[1, 2], window_size=4, num_labels=5))


def _convnext() -> nn.Module:
    return transformers.ConvNextForImageClassification(transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=5))


def _mobilenet() -> nn.Module:
    return transformers.MobileNetV2ForImageClassification(transformers.MobileNetV2Config(image_size=16, depth_multiplier=0.35, num_labels=5))


def _tokens(batch: int = 3, length: int = 8, padded: bool = False) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))
    if not padded:
        return {"input_ids": ids}
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length // 2 :] = 0  # one padded sample: the mask must reach the attention scores
    return {"input_ids": ids, "attention_mask": mask}


def _pixels() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))}


def _built(factory: Any) -> nn.Module:
    torch.manual_seed(0)
    return factory().eval()


def _leaves(output: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("factory,inputs", [
    (_bert, _tokens(padded=True)), (_gpt2, _tokens(padded=True)), (_t5, _tokens()), (_distilbert, _tokens(padded=True)),
    (_vit, _pixels()), (_swin, _pixels()), (_convnext, _pixels()), (_mobilenet, _pixels()),
], ids=["bert", "gpt2", "t5", "distilbert", "vit", "swin", "convnext", "mobilenetv2"])
def test_hf_model_lowers_as_is_and_computes_what_it_computes(factory: Any, inputs: dict[str, torch.Tensor]) -> None:
    model = _built(factory)
    graph = lower_module(model, inputs)  # a dict: keyword inputs; auto: fx, then torch.export
    assert graph.meta["frontend"] in ("fx", "export")
    assert [v.name for v in graph.inputs] == list(inputs)
    assert not [n.name for n in graph.nodes if n.kind.value == "opaque" and n.attrs.get("op") != "embedding"]
    with torch.no_grad():
        expected = _leaves(model(**inputs, **({"use_cache": False} if "use_cache" in model.forward.__code__.co_varnames else {})))
    got = Interpreter(graph).run(list(inputs.values())).outputs
    assert len(got) == len(expected)  # every tensor of the ModelOutput is a graph output
    for g, e in zip(got, expected):
        scale = max(1.0, float(e.abs().max()))
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * scale)


def test_padding_mask_changes_the_lowered_output() -> None:
    """The attention mask is real semantics, not dropped: masking tokens changes the other tokens' states."""
    model = _built(_bert)
    inputs = _tokens(padded=True)
    graph = lower_module(model, inputs)
    full = {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])}
    masked_out = Interpreter(graph).run(list(inputs.values())).outputs[0]
    full_out = Interpreter(graph).run(list(full.values())).outputs[0]
    assert not torch.allclose(masked_out[1, :4], full_out[1, :4])
    torch.testing.assert_close(masked_out[0], full_out[0])


@pytest.fixture(scope="module")
def lowered() -> dict[str, Any]:
    """BERT, GPT-2 and ViT lowered once (input_ids / pixel_values), with a random prune batch each."""
    out = {}
    for name, factory, example in (("bert", _bert, _tokens()["input_ids"]), ("gpt2", _gpt2, _tokens()["input_ids"]),
                                   ("vit", _vit, _pixels()["pixel_values"])):
        graph = lower_module(_built(factory), example)
        out[name] = (graph, load_batch_for(graph, "random", samples_per_class=1, seed=0))
    return out


@pytest.mark.parametrize("method", ["magnitude", "random", "synflow", "snip", "grasp", "dpai"])
@pytest.mark.parametrize("name", ["bert", "gpt2", "vit"])
def test_every_criterion_runs_on_hf_models(lowered: dict[str, Any], name: str, method: str) -> None:
    graph, batch = lowered[name]
    result = optimize(graph.clone(), sparsity=0.8, method=method, steps=3 if method == "dpai" else None,
                      data=batch if method in ("snip", "grasp") else None)
    params = result.graph.prunable_params()
    kept = sum(int(p.mask_or_ones().sum()) for p in params)
    total = sum(p.data.size for p in params)
    assert total > 0 and abs(kept / total - 0.2) < 0.02
    assert sum(p.mask is not None and 0 < p.mask.sum() < p.mask.size for p in params) >= len(params) // 2


def test_prune_takes_a_dict_and_masks_apply_by_fqn() -> None:
    model = _built(_bert)
    result = pai_compiler.prune(model, _tokens(padded=True), sparsity=0.9, method="magnitude")
    assert result.graph.meta["frontend"] == "export"
    assert "encoder.layer.0.attention.self.query.weight" in result.masks
    assert abs(result.density - 0.1) < 0.01
    result.apply(model)
    assert float((model.encoder.layer[0].attention.self.query.weight == 0).float().mean()) > 0.5


class TiedLM(nn.Module):
    """A token model whose output projection is its embedding table (fx and export both trace it)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.hidden = nn.Linear(16, 16)
        self.head = nn.Linear(16, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.embed(ids))))


@pytest.mark.parametrize("lower", [lower_fx, lower_export], ids=["fx", "export"])
def test_tied_head_is_dense_with_a_warning_or_pruned_on_request(lower: Any) -> None:
    ids = _tokens()["input_ids"]
    graph = lower(_built(TiedLM), ids)
    assert [p.origin for p in graph.prunable_params()] == ["hidden.weight"]
    assert [w for w in graph.meta["warnings"] if w.startswith("tied weights embed.weight = head.weight") and "--prune-tied" in w]
    tied = lower(_built(TiedLM), ids, prune_tied=True)
    assert sorted(p.origin for p in tied.prunable_params()) == ["embed.weight", "hidden.weight"]
    model = _built(TiedLM)
    result = pai_compiler.prune(model, ids, sparsity=0.5, method="magnitude", frontend=lower.__name__.removeprefix("lower_"), prune_tied=True)
    result.apply(model)
    assert torch.equal(model.head.weight, model.embed.weight)  # still one tensor, masked the same through both names
    assert float((model.embed.weight == 0).float().mean()) > 0.2


def test_gpt2_tied_head_decision_is_reported() -> None:
    result = pai_compiler.prune(_built(_gpt2), _tokens()["input_ids"], sparsity=0.5, method="magnitude")
    assert "transformer.wte.weight" not in result.masks
    assert any("tied weights transformer.wte.weight = lm_head.weight" in w for w in result.report["warnings"])
    pruned = pai_compiler.prune(_built(_gpt2), _tokens()["input_ids"], sparsity=0.5, method="magnitude", prune_tied=True)
    assert "transformer.wte.weight" in pruned.masks


HF_SPEC = textwrap.dedent(f"""
    import transformers

    def bert():
        return transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                              intermediate_size=64, vocab_size={VOCAB}, max_position_embeddings=32))
""")


def test_cli_named_integer_inputs_on_an_hf_model(tmp_path: Path) -> None:
    spec = tmp_path / "hf.py"
    spec.write_text(HF_SPEC)
    out = tmp_path / "bert.pt"
    res = CliRunner().invoke(app, ["optimize", f"{spec}:bert", "--input-shape", "input_ids=2,8:int64", "--input-shape",
                                   "attention_mask=2,8:int64", "-m", "magnitude", "--sparsity", "0.9", "-o", str(out),
                                   "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert "lowered with torch.export" in res.output and out.exists()
    assert '"frontend": "export"' in (tmp_path / "r.json").read_text()


def test_cli_input_shape_errors(tmp_path: Path) -> None:
    spec = tmp_path / "hf.py"
    spec.write_text(HF_SPEC)
    runner = CliRunner()
    for bad in ("input_ids=2,8:int77", "2,8=3", "input_ids=2,x"):
        res = runner.invoke(app, ["audit", f"{spec}:bert", "--input-shape", bad])
        assert res.exit_code == 2 and "--input-shape" in res.output, (bad, res.output)
    res = runner.invoke(app, ["audit", f"{spec}:bert", "--input-shape", "pixels=2,8:int64"])
    assert res.exit_code == 1 and "'pixels'" in res.output


def test_failed_integer_retry_reports_its_own_error(tmp_path: Path) -> None:
    spec = tmp_path / "m.py"
    spec.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class IndexedTwice(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(10, 4)

            def forward(self, ids):
                if ids.dtype.is_floating_point:
                    raise ValueError("float indices")
                raise RuntimeError("integer attempt broke")
    """))
    with pytest.raises(ModelError, match="integer attempt broke"):
        pai_compiler.api.load_model(f"{spec}:IndexedTwice", input_shape="2,5")


class HeadFirst(nn.Module):
    """The tied weight is read by the linear layer before the embedding lookup (the other order)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.proj = nn.Linear(16, VOCAB, bias=False)
        self.proj.weight = self.embed.weight

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(x), self.embed(ids)


@pytest.mark.parametrize("lower", [lower_fx, lower_export], ids=["fx", "export"])
def test_tie_decision_does_not_depend_on_which_use_comes_first(lower: Any) -> None:
    example = (torch.randn(2, 16), _tokens(2)["input_ids"])
    graph = lower(_built(HeadFirst), example)
    assert graph.prunable_params() == [] and any(w.startswith("tied weights embed.weight = proj.weight") for w in graph.meta["warnings"])
    tied = lower(_built(HeadFirst), example, prune_tied=True)
    assert [p.origin for p in tied.prunable_params()] == ["embed.weight"]
    tables = [n.params["table"] for n in tied.nodes if n.attrs.get("op") == "embedding"]
    assert len(tables) == 1 and not tables[0].prunable and tables[0].origin == "embed.weight"


def _gpt_neo() -> nn.Module:
    return transformers.GPTNeoModel(transformers.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                                                              attention_types=[[["global", "local"], 1]], window_size=4))


def test_where_on_a_causal_mask_is_real_semantics() -> None:
    """GPT-Neo selects its scores with ``where(causal_mask, scores, min)`` (a constant bool buffer) and
    turns the padding mask additive with ``where(mask, 0, min)``: both are the interpreter's ``where``
    (the condition gates, paths add), so the lowered graph computes the model on a padded batch and
    the forward-pass criteria run (before: opaque "where on activations", snip/synflow/dpai refused)."""
    model, inputs = _built(_gpt_neo), _tokens(padded=True)
    graph = lower_module(model, inputs)
    wheres = [n for n in graph.nodes if n.attrs.get("op") == "where"]
    assert len(wheres) >= 2 and all(rule_for(n, "real") is not None for n in graph.nodes if n.kind.value == "opaque")
    with torch.no_grad():
        expected = model(**inputs, use_cache=False).last_hidden_state
    got = Interpreter(graph).run(list(inputs.values())).outputs[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * max(1.0, float(expected.abs().max())))
    batch = load_batch_for(graph, "random", samples_per_class=1, seed=0)
    for method in ("snip", "dpai"):
        result = optimize(graph.clone(), sparsity=0.8, method=method, steps=3 if method == "dpai" else None, data=batch if method == "snip" else None)
        params = result.graph.prunable_params()
        assert abs(sum(p.kept() for p in params) / sum(p.numel for p in params) - 0.2) < 0.02
