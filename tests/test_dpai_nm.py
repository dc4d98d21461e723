"""DPaI with an N:M allocation (``erk{pattern=2:4},dpai``): patterned layers keep N of every M, every step.

Checked through the CLI and the API on ResNet-20 and the tiny ViT (pattern, counts, seeds), against
an independent group top-N (a stable descending sort of each group of the final scores; the
unpatterned layers' top-k by ``topk_mask``), on every R_P convention, and for the refusals.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pai_compiler.api import load_model, optimize
from pai_compiler.cli import app
from pai_compiler.errors import PaicError, UsageError
from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.ir import Graph
from pai_compiler.pass_infra import PassManager
from pai_compiler.passes.allocation.base import Allocation
from pai_compiler.passes.allocation.pattern import NMPattern, is_nm_mask
from pai_compiler.passes.analysis.bindings import sample_bindings
from pai_compiler.passes.criteria.base import topk_mask
from pai_compiler.passes.criteria.dpai.driver import build, initial_scores
from pai_compiler.passes.criteria.dpai.fixed_pool import FixedPoolTopK
from pai_compiler.passes.criteria.dpai.kernel_state import AbsScores, KernelScores, ScoreSource
from pai_compiler.passes.criteria.dpai.layout import Layout
from pai_compiler.passes.criteria.dpai.loop import KernelStep, optimise
from pai_compiler.pipeline import parse_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
PIPELINE = "erk{pattern=2:4},dpai{steps=20}"


def _check_pattern(params: list, patterns: dict[str, NMPattern], keep: dict[str, int], masks: dict[str, np.ndarray]) -> None:
    assert patterns, "some layer holds the pattern"
    for p in params:
        mask = masks[p.name]
        assert int(mask.sum()) == keep[p.name], p.name
        if p.name in patterns:
            assert is_nm_mask(mask, p, patterns[p.name]) and 2 * int(mask.sum()) == p.numel, p.name


@pytest.mark.parametrize("name", ["resnet20", "tiny_vit"])
def test_api_masks_hold_the_pattern_and_repeat(name: str) -> None:
    runs = [optimize(EXAMPLES / f"{name}.onnx", pipeline=PIPELINE, seed=seed) for seed in (5, 5, 6)]
    for result in runs:
        params = result.graph.prunable_params()
        _check_pattern(params, dict(result.allocation.patterns), dict(result.allocation.keep), {p.name: p.mask for p in params})
        assert result.records[-1].report.patterns == {k: "2:4" for k in result.allocation.patterns}
    masks = [[p.mask for p in result.graph.prunable_params()] for result in runs]
    assert all(np.array_equal(a, b) for a, b in zip(masks[0], masks[1]))  # same seed, same masks bit for bit
    assert not all(np.array_equal(a, b) for a, b in zip(masks[0], masks[2]))


@pytest.mark.parametrize("name", ["resnet20", "tiny_vit"])
def test_cli_writes_the_masks_the_api_picks(name: str, tmp_path: Path) -> None:
    out = tmp_path / "pruned.onnx"
    result = CliRunner().invoke(app, ["optimize", str(EXAMPLES / f"{name}.onnx"), "--pipeline", PIPELINE, "-o", str(out), "--seed", "2", "-q"])
    assert result.exit_code == 0, result.output
    api = optimize(EXAMPLES / f"{name}.onnx", pipeline=PIPELINE, seed=2)
    written = {p.name: p.data != 0 for p in load_model(str(out)).prunable_params()}
    params = api.graph.prunable_params()
    _check_pattern(params, dict(api.allocation.patterns), dict(api.allocation.keep), written)
    for p in params:  # the masked weights are the API's masks (initial weights are nonzero)
        assert np.array_equal(written[p.name], p.mask), p.name


def _independent(layout: Layout, patterns: dict[str, NMPattern], source: ScoreSource) -> np.ndarray:
    """Flat kept mask: per group of M inputs (same out, same tap) the N highest |S| by a stable
    descending sort (ties to the lower input), other layers by their top-k."""
    flat = np.zeros(layout.numel, dtype=bool)
    for layer in layout.layers:
        values = source.layer(layer.offset, layer.numel).double().numpy()
        if layer.name not in patterns:
            flat[layer.offset : layer.offset + layer.numel] = topk_mask(values, layer.keep)
            continue
        nm = patterns[layer.name]
        groups = np.moveaxis(values.reshape(layer.out_ch, layer.in_ch // nm.m, nm.m, layer.taps), 2, -1)
        order = np.argsort(-groups, axis=-1, kind="stable")
        keep = np.zeros(groups.shape, dtype=bool)
        np.put_along_axis(keep, order[..., : nm.n], True, axis=-1)
        flat[layer.offset : layer.offset + layer.numel] = np.moveaxis(keep, -1, 2).reshape(-1)
    return flat


def _allocated(graph: Graph, text: str) -> Allocation:
    return PassManager(parse_pipeline(text)).run(graph)[0].report


@pytest.mark.parametrize("host", [True, False])
def test_final_mask_is_the_group_top_n_of_the_final_scores(host: bool) -> None:
    """Kernel state, sync-free pools (channel R_P): the host (numpy) and device (torch) selections."""
    g = load_onnx_model(EXAMPLES / "resnet20.onnx")
    allocation = _allocated(g, "erk{pattern=2:4}")
    patterns = dict(allocation.patterns)
    layout, _, update, step = build(g, g.prunable_params(), allocation.keep, "channel", 0.99, 0.5, "cpu", sample_bindings(g), "index", patterns)
    view = KernelScores(layout, initial_scores(layout, 1, "cpu"), "cpu")
    topk = FixedPoolTopK(layout, "cpu", host_partition=host, patterns=patterns)
    result = optimise(view.offset, KernelStep(step.program, update), topk, update, steps=60, lr=0.02, view=view, record_every=20)
    kept = np.zeros(layout.numel, dtype=bool)
    kept[result.kept.index.numpy()] = True
    assert result.kept.index.numel() == layout.total_keep
    assert np.array_equal(kept, _independent(layout, patterns, view))
    assert float(view.offset.detach().abs().max()) > 0.1  # the scores moved: groups were re-ranked


@pytest.mark.parametrize("paths,ties", [("ref", "sort"), ("exact", "index"), ("channel", "sort")])
def test_every_convention_picks_the_group_top_n(paths: str, ties: str) -> None:
    """Per-weight scores (``state=weights``/per-pixel modes): the final pick is the independent one."""
    g = load_onnx_model(EXAMPLES / "vgg_small.onnx")
    allocation = _allocated(g, "uniform{sparsity=0.6,pattern=1:4}")
    patterns = dict(allocation.patterns)
    layout, topk, update, step = build(g, g.prunable_params(), allocation.keep, paths, 0.99, 0.5, "cpu", sample_bindings(g), ties, patterns)
    scores = initial_scores(layout, 4, "cpu")
    result = optimise(scores, step, topk, update, steps=15, lr=0.05)
    kept = np.zeros(layout.numel, dtype=bool)
    kept[result.kept.index.numpy()] = True
    assert patterns and np.array_equal(kept, _independent(layout, patterns, AbsScores(scores)))


def test_host_and_device_group_picks_agree_on_ties() -> None:
    """Integer-valued scores (ties in most groups): numpy and torch list the same entries in the same order."""
    g = load_onnx_model(EXAMPLES / "vgg_small.onnx")
    allocation = _allocated(g, "erk{pattern=2:4}")
    layout = Layout(g.prunable_params(), allocation.keep)
    scores = torch.randint(-3, 4, (layout.numel,), generator=torch.Generator().manual_seed(0)).float()
    device, host = (FixedPoolTopK(layout, "cpu", host_partition=h, patterns=allocation.patterns) for h in (False, True))
    picked = [topk.grouped.picks(AbsScores(scores)) for topk in (device, host)]
    listed = [torch.from_numpy(p) for p in host.grouped.host_picks(AbsScores(scores))]
    assert all(torch.equal(a, b) for a, b in zip(picked[0], listed))
    flat = np.zeros(layout.numel, dtype=bool)
    flat[torch.cat(listed).numpy()] = True
    grouped = {layer.name for layer in host.grouped.layers}
    expected = _independent(layout, {k: v for k, v in allocation.patterns.items() if k in grouped}, AbsScores(scores))
    for layer in host.grouped.layers:
        assert np.array_equal(flat[layer.offset : layer.offset + layer.numel], expected[layer.offset : layer.offset + layer.numel])


@pytest.mark.parametrize(("pipeline", "match"), [
    ("erk{pattern=2:4},dpai{steps=2,state=band}", "state=band keeps scores only near each layer's cut"),
    ("erk{pattern=2:4},dpai{steps=2,sparsity=0.9}", "own sparsity would replace the N:M counts"),
])
def test_unsupported_combinations_are_refused_with_the_fix(pipeline: str, match: str) -> None:
    with pytest.raises(PaicError, match=match) as info:
        optimize(EXAMPLES / "vgg_small.onnx", pipeline=pipeline)
    assert info.value.exit_code == UsageError.exit_code
    assert "\n" not in str(info.value)
