"""DPaI's kernel-level state (channel R_P): the per-weight dynamics with |S| = |S0| + live * O_k."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.ir import Graph, GraphBuilder
from pai_compiler.pass_infra import AnalysisManager, PassManager, RunContext
from pai_compiler.passes.analysis.bindings import sample_bindings
from pai_compiler.passes.criteria.dpai.driver import build, initial_scores
from pai_compiler.passes.criteria.dpai.kernel_state import KernelScores
from pai_compiler.passes.criteria.dpai.loop import Adam, KernelStep
from pai_compiler.passes.criteria.dpai.outcome import DpaiReport
from pai_compiler.passes.criteria.dpai.select import adam_step_bound
from pai_compiler.pipeline import parse_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"


def _dead_tap_graph() -> Graph:
    b = GraphBuilder("tiny")
    x = b.conv(b.input((1, 2, 2, 2)), 4, 3, stride=2, pad=1)
    x = b.conv(x, 3, 3, pad=1)
    return b.build(b.linear(b.flatten(x), 2))


@pytest.mark.parametrize("model,sparsity,lr", [("resnet20", 0.99, 0.005), ("dead_taps", 0.5, 0.05)])
def test_kernel_state_moves_every_score_as_the_per_weight_state(model: str, sparsity: float, lr: float) -> None:
    """Fed the same kept sets, per-weight S and kernel offsets give the same |S| (to float rounding),
    except scores that reached 0: per weight they hover around 0, here they are held at it."""
    g = _dead_tap_graph() if model == "dead_taps" else load_onnx_model(EXAMPLES / f"{model}.onnx")
    keep = dict(PassManager(parse_pipeline(f"erk{{sparsity={sparsity}}}")).run(g)[0].report.keep)
    layout, topk, update, step = build(g, g.prunable_params(), keep, "channel", 0.99, 0.5, "cpu", sample_bindings(g), "index")
    scores = initial_scores(layout, 7, "cpu")
    kernel = KernelScores(layout, scores, "cpu")
    kstep = KernelStep(step.program, update)
    scores.grad, kernel.offset.grad = torch.zeros_like(scores), torch.zeros_like(kernel.offset)
    per_weight, per_kernel = Adam(scores, lr), Adam(kernel.offset, lr)
    moved = 0.0
    for t in range(25):
        kept = update.kept(topk.select(scores))
        step(scores, kept, scores.grad)
        kstep(kernel.offset, kept, kernel.offset.grad)
        per_weight.step()
        per_kernel.step()
        kernel.stepped()
        topk.moved(lr * adam_step_bound(t + 1) * (1 + 1e-3) + 1e-6)
        magnitudes = torch.cat([kernel.layer(layer.offset, layer.numel) for layer in layout.layers])
        floor = kernel.floor[torch.cat([torch.arange(layer.kernels).repeat_interleave(layer.taps) + layer.kernel_offset for layer in layout.layers])]
        held = kernel.base + floor < 0
        torch.testing.assert_close(magnitudes[~held], scores.detach().abs()[~held], rtol=1e-6, atol=1e-6)
        if bool(held.any()):
            assert float((magnitudes[held] - scores.detach().abs()[held]).abs().max()) <= 10 * lr
        moved = float((magnitudes - kernel.base).abs().max())
    assert moved > 10 * lr  # the scores did move
    assert kernel.crossed() == int(held.sum()) < 0.01 * layout.numel
    if layout.tap_live:  # dead taps never move
        live = torch.cat([torch.as_tensor(layout.tap_live.get(layer.name, np.ones(layer.taps, bool))).repeat(layer.kernels) for layer in layout.layers])
        assert torch.equal(magnitudes[~live], kernel.base[~live])


def _report(graph: Graph, spec: str, seed: int) -> DpaiReport:
    records = PassManager(parse_pipeline(spec)).run(graph, AnalysisManager(graph, RunContext(seed=seed)))
    report = records[-1].report
    assert isinstance(report, DpaiReport)
    return report


def test_kernel_state_tracks_the_per_weight_run() -> None:
    """Whole runs: the kernel state (default) and the per-weight state agree on the masks' statistics."""
    full, weights = (load_onnx_model(EXAMPLES / "resnet20.onnx") for _ in range(2))
    a = _report(full, "erk{sparsity=0.99},dpai{steps=150,state=full}", 1)
    b = _report(weights, "erk{sparsity=0.99},dpai{steps=150,state=weights}", 1)
    assert a.state == "full" and b.state == "weights" and a.topk["crossed_zero"] < 0.01 * sum(p.numel for p in full.prunable_params())
    same = sum(int((p.mask_or_ones() == q.mask_or_ones()).all()) for p, q in zip(full.prunable_params(), weights.prunable_params()))
    kept = [(p.mask_or_ones() & q.mask_or_ones()).sum() / max(int(q.mask_or_ones().sum()), 1) for p, q in zip(full.prunable_params(), weights.prunable_params())]
    # float rounding moves boundary ties, so the runs part ways slowly: most kept weights agree
    assert float(np.mean(kept)) > 0.9 and min(kept) > 0.75 and same >= 1
    for key in ("nodes", "kernels", "params"):
        assert abs(a.final[key] - b.final[key]) <= 0.03 * b.final[key]


@pytest.mark.parametrize("model", ["resnet20", "tiny_vit", "dead_taps"])
def test_per_kernel_broadcast_is_repeat_interleave(model: str) -> None:
    g = _dead_tap_graph() if model == "dead_taps" else load_onnx_model(EXAMPLES / f"{model}.onnx")
    keep = dict(PassManager(parse_pipeline("erk{sparsity=0.9}")).run(g)[0].report.keep)
    layout, _, update, _ = build(g, g.prunable_params(), keep, "channel", 0.99, 0.5, "cpu", sample_bindings(g), "index")
    per_node = torch.randn(layout.n_nodes)
    assert torch.equal(update.per_kernel(per_node), per_node.repeat_interleave(layout.kernels_per_node("cpu")))
