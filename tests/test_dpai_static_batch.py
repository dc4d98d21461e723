"""DPaI on TorchScript exports at a static batch 2 (HF vision models are exported that way).

The channel program stores a conv map [N, C, *spatial] as one value per channel; each construct
below once assumed N = 1 (a numpy broadcast/reshape error reached the user). Every sample of a
static batch carries the same path counts, so the batch-2 export must give the batch-1 masks
bit for bit and log P larger by exactly log 2 (two copies of every path).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pai_compiler.api import load_model, optimize
from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.passes.analysis.bindings import sample_bindings
from pai_compiler.passes.criteria.dpai.driver import build, initial_scores
from pai_compiler.lab.data import load_batch_for
from pai_compiler.pass_infra import PassManager
from pai_compiler.pipeline import parse_pipeline


class PoolFlatten(nn.Module):
    """HF ResNet's head: pool to (N, C, 1, 1), Flatten to (N, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1), 1))


class PaddedConvs(nn.Module):
    """MobileNetV2 / EfficientNet "same" padding: an explicit Pad makes a real map before each conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.depthwise, self.fc = nn.Conv2d(3, 8, 3, stride=2), nn.Conv2d(8, 8, 3, groups=8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.pad(x, (0, 1, 0, 1)))
        return self.fc(self.depthwise(F.pad(torch.relu(x), (1, 1, 1, 1))).mean((2, 3)))


class ChannelsLast(nn.Module):
    """ConvNeXt's block: permute to NHWC, LayerNorm, Linear, permute back, residual, depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.norm, self.mlp = nn.Conv2d(3, 8, 2, stride=2), nn.LayerNorm(8), nn.Linear(8, 8)
        self.depthwise, self.fc = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.fc(self.depthwise(x + y).mean((2, 3)))


class MeanHead(nn.Module):
    """A spatial mean straight to (N, C) (ReduceMean, keepdims=0)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


CONSTRUCTS = {"pool_flatten": PoolFlatten, "padded_convs": PaddedConvs, "channels_last": ChannelsLast, "mean_head": MeanHead}


def _export(name: str, batch: int, tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = CONSTRUCTS[name]().eval()
    path = tmp_path / f"{name}_b{batch}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(batch, 3, 8, 8),), str(path), dynamo=False, opset_version=17)
    return path


def _masks(path: Path, method: str) -> dict[str, np.ndarray]:
    options: dict[str, Any] = {"steps": 3} if method == "dpai" else {}
    if method in ("snip", "grasp"):
        options["data"] = load_batch_for(load_model(str(path)), "random")
    result = optimize(str(path), sparsity=0.5, method=method, **options)
    return {p.name: p.mask_or_ones().copy() for p in result.graph.prunable_params()}


def _log_paths(path: Path) -> float:
    graph = load_onnx_model(path)
    allocation = PassManager(parse_pipeline("erk{sparsity=0.5}")).run(graph)[0].report
    layout, topk, update, step = build(graph, graph.prunable_params(), dict(allocation.keep), "channel", 0.99, 0.5, "cpu", sample_bindings(graph), "auto")
    scores = initial_scores(layout, 0, "cpu")
    return float(step(scores, update.kept(topk.select(scores)), None).read()["log_paths"])


@pytest.mark.parametrize("name", sorted(CONSTRUCTS))
def test_dpai_at_static_batch_2_equals_batch_1(name: str, tmp_path: Path) -> None:
    one, two = _export(name, 1, tmp_path), _export(name, 2, tmp_path)
    first, second = _masks(one, "dpai"), _masks(two, "dpai")
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)
    kept = sum(int(m.sum()) for m in second.values()) / sum(m.size for m in second.values())
    assert 0.45 < kept < 0.55
    assert _log_paths(two) == pytest.approx(_log_paths(one) + math.log(2), abs=1e-4)


@pytest.mark.parametrize("method", ["synflow", "snip", "grasp", "npb"])
def test_other_criteria_at_static_batch_2_equal_batch_1(method: str, tmp_path: Path) -> None:
    for name in ("padded_convs", "channels_last"):
        first, second = _masks(_export(name, 1, tmp_path), method), _masks(_export(name, 2, tmp_path), method)
        assert all(np.array_equal(first[k], second[k]) for k in first), name


def test_a_tape_failure_is_a_model_error_naming_the_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shape the channel program did not foresee ends in one line naming the node, not numpy's error."""
    from pai_compiler.errors import ModelError, PaicError
    from pai_compiler.passes.criteria.dpai import tape

    def broken(self: tape.Expand, env: list[object]) -> None:
        raise ValueError("operands could not be broadcast together with shapes (8,) (16,)")

    monkeypatch.setattr(tape.Expand, "forward", broken)
    with pytest.raises(PaicError, match=r": dpai: node '[^']+' \(pool\): the channel-level path count cannot run it \(operands could "
                                         r"not be broadcast .*\); try dpai\{paths=ref\}") as info:
        optimize(str(_export("mean_head", 2, tmp_path)), sparsity=0.5, method="dpai", steps=1)
    assert isinstance(info.value.__cause__, ModelError) and info.value.exit_code == 1 and "\n" not in str(info.value)
