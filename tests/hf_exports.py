"""Test helper: small Hugging Face models (random weights, built from configs) exported to ONNX.

Each ``HfCase`` builds one model with a tiny config and wraps it so that it takes one tensor
and returns one (``last_hidden_state``, ``logits`` or ``pooler_output``). ``export_case`` writes
it with the TorchScript exporter (opset 17, ``dynamo=False``, optionally with dynamic
batch/sequence axes) or the dynamo exporter (``dynamo=True``, optionally with dynamic axes).
No hub access: ``HF_HUB_OFFLINE=1`` is set before transformers is imported.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

__all__ = ["HfCase", "CASES", "Exporter", "export_case", "build_model"]

Exporter = Literal["torchscript", "torchscript-dynamic", "dynamo", "dynamo-dynamic"]


@dataclass(frozen=True)
class HfCase:
    """A model family: how to build it, its example input, and which axes of it may be dynamic."""

    name: str
    build: Callable[[str], torch.nn.Module]  # attention implementation (sdpa, eager; convnets ignore it) -> model
    example: Callable[[int], torch.Tensor]  # batch -> input
    output: str  # attribute of the model output that the wrapper returns
    dynamic_axes: dict[int, str]


class _OneTensor(torch.nn.Module):
    """``model(x).<output>``: one tensor in, one tensor out (both exporters take it as is)."""

    def __init__(self, model: torch.nn.Module, output: str) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(x), self.output)


def _ids(vocab: int, seq: int = 8) -> Callable[[int], torch.Tensor]:
    return lambda batch: torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def _image(size: int, channels: int = 3) -> Callable[[int], torch.Tensor]:
    return lambda batch: torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0))


_TEXT = {0: "batch", 1: "seq"}
_IMAGE = {0: "batch"}

CASES: dict[str, HfCase] = {
    "bert": HfCase("bert", lambda attn: transformers.BertModel(transformers.BertConfig(
        attn_implementation=attn,
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=1000), add_pooling_layer=False), _ids(1000), "last_hidden_state", _TEXT),
    "gpt2": HfCase("gpt2", lambda attn: transformers.GPT2Model(transformers.GPT2Config(
        attn_implementation=attn,
        n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=64)), _ids(1000), "last_hidden_state", _TEXT),
    "distilbert": HfCase("distilbert", lambda attn: transformers.DistilBertModel(transformers.DistilBertConfig(
        attn_implementation=attn,
        dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=1000)), _ids(1000), "last_hidden_state", _TEXT),
    "t5enc": HfCase("t5enc", lambda attn: transformers.T5EncoderModel(transformers.T5Config(
        attn_implementation=attn,
        d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=1000)), _ids(1000), "last_hidden_state", _TEXT),
    "vit": HfCase("vit", lambda attn: transformers.ViTModel(transformers.ViTConfig(
        attn_implementation=attn,
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8), add_pooling_layer=False),
        _image(32), "last_hidden_state", _IMAGE),
    "swin": HfCase("swin", lambda attn: transformers.SwinModel(transformers.SwinConfig(
        attn_implementation=attn,
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4)), _image(32), "pooler_output", _IMAGE),
    "convnext": HfCase("convnext", lambda attn: transformers.ConvNextModel(transformers.ConvNextConfig(
        hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=32)), _image(32), "pooler_output", _IMAGE),
    "mobilenetv2": HfCase("mobilenetv2", lambda attn: transformers.MobileNetV2Model(transformers.MobileNetV2Config(
        image_size=32, depth_multiplier=0.35)), _image(32), "pooler_output", _IMAGE),
}


def build_model(case: HfCase, seed: int = 0, attention: str = "sdpa") -> torch.nn.Module:
    """The case's model with seeded random weights, in eval mode, wrapped to one tensor in/out;
    ``attention``: HF's attention implementation (``sdpa`` is its default, ``eager`` plain matmuls)."""
    torch.manual_seed(seed)
    return _OneTensor(case.build(attention).eval(), case.output).eval()


def export_case(case: HfCase, exporter: Exporter, out: Path, *, batch: int = 1, attention: str = "sdpa") -> Path:
    """Export ``case`` with ``exporter`` to ``out`` (a .onnx path) and return it."""
    model = build_model(case, attention=attention)
    dynamic = exporter.endswith("-dynamic")
    x = case.example(max(batch, 2) if dynamic else batch)  # torch.export specialises a size-1 axis
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter.startswith("torchscript"):
            torch.onnx.export(model, (x,), str(out), opset_version=17, dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": case.dynamic_axes, "y": {0: "batch"}} if dynamic else None)
        else:
            shapes = ({axis: torch.export.Dim(name, min=2) for axis, name in case.dynamic_axes.items()},) if dynamic else None
            torch.onnx.export(model, (x,), str(out), dynamo=True, dynamic_shapes=shapes, verbose=False)
    return out
