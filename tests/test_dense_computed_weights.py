"""Dense weights computed by the model (weight norm: a non-prunable Param without layout axes): DPaI's channel tape and compaction."""
from __future__ import annotations

import torch
from torch import nn

from pai_compiler.frontends.torch.spec import lower_module
from pai_compiler.passes.analysis.bindings import sample_bindings
from pai_compiler.passes.criteria.dpai.loop import PixelStep
from pai_compiler.passes.criteria.dpai.pixel_paths import PixelObjective
from pai_compiler.passes.criteria.dpai.driver import build, initial_scores
from pai_compiler.pass_infra import PassManager
from pai_compiler.pipeline import parse_pipeline


class _WeightNormed(nn.Module):
    """conv -> grouped conv under weight norm (wav2vec2's positional conv) -> conv -> linear."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.first = nn.Conv1d(3, 8, 3, padding=1)
        self.normed = nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 8, 5, padding=2, groups=groups), dim=2)
        self.last = nn.Conv1d(8, 6, 3)
        self.head = nn.Linear(6 * 10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.last(torch.relu(self.normed(torch.relu(self.first(x)))))
        return self.head(y.flatten(1))


def test_channel_tape_counts_a_weight_normed_conv_like_the_per_pixel_count() -> None:
    for groups in (1, 2, 8):
        torch.manual_seed(0)
        g = lower_module(_WeightNormed(groups).eval(), torch.randn(2, 3, 12))
        normed = [n for n in g.nodes if n.kind.value == "conv" and n.attrs.get("groups") == groups and "weight" in n.params]
        assert any(not n.params["weight"].prunable for n in normed)  # the computed weight stays dense
        allocation = PassManager(parse_pipeline("erk{sparsity=0.8}")).run(g)[0].report
        layout, topk, update, step = build(g, g.prunable_params(), dict(allocation.keep), "channel", 0.99, 0.5, "cpu", sample_bindings(g), "auto")
        kept = update.kept(topk.select(initial_scores(layout, 1, "cpu")))
        chan = step(initial_scores(layout, 1, "cpu"), kept, None).read()
        pixel = PixelStep(PixelObjective(g, layout, "ref", "cpu", sample_bindings(g)), update)(torch.ones(layout.numel), kept, None).read()
        assert (chan["nodes"], chan["kernels"], chan["params"]) == (pixel["nodes"], pixel["kernels"], pixel["params"])


class _Residual(nn.Module):
    """h = conv(x); y = weight_normed(h) + h: dead rows of ``conv`` leave constant channels that
    the residual keeps, so compaction folds them into the dense (computed) weight's consumer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.normed = nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 8, 3, padding=1, groups=2), dim=2)
        self.head = nn.Conv1d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.head(torch.relu(self.normed(h) + h))


def test_compaction_reaches_a_fixpoint_when_it_zeroes_a_dense_weight() -> None:
    """Dense weights are tightened by zeroing them; connectivity must see the zeros, or the same fold
    is planned again every round (wav2vec2: "dead-node-elim still changed after 16 rounds")."""
    from pai_compiler.api import compact_graph
    from pai_compiler.interp import Interpreter

    torch.manual_seed(0)
    x = torch.randn(2, 3, 10)
    g = lower_module(_Residual().eval(), x)
    conv = next(n for n in g.nodes if n.kind.value == "conv" and n.params["weight"].prunable and n.params["weight"].shape[0] == 8)
    mask = conv.params["weight"].mask_or_ones().copy()
    mask[[1, 4, 6]] = False  # three whole rows: constant (bias-only) channels that the residual keeps
    g.set_mask(conv.params["weight"], mask)
    before = Interpreter(g).run([x]).outputs[0]
    report = compact_graph(g)
    assert report.rounds >= 1
    torch.testing.assert_close(Interpreter(g).run([x]).outputs[0], before, rtol=1e-5, atol=1e-6)
