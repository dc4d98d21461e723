"""DPaI's channel tape on convs whose weight is not prunable (computed by weight norm: no layout axes)."""
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
