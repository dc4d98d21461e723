"""torch frontend data movement: ``torch.roll`` (Swin's shifted windows) and ``masked_fill``, under fx and torch.export."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pai_compiler.api import optimize
from pai_compiler.frontends.torch.spec import lower_module
from pai_compiler.interp import Interpreter


class _Shifted(nn.Module):
    """conv -> roll by (-1, 2) over H, W -> conv -> roll back -> mask the first row with a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 1)
        self.register_buffer("row", torch.arange(5).view(1, 1, 5, 1) == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.roll(torch.relu(self.a(x)), shifts=(-1, 2), dims=(2, 3))
        y = self.b(y).roll(1, 2)
        return y.masked_fill(self.row, -3.0)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_roll_and_masked_fill_lower_as_data_movement(frontend: str) -> None:
    torch.manual_seed(0)
    module = _Shifted().eval()
    x = torch.randn(2, 3, 5, 7)
    g = lower_module(module, x, frontend)
    assert not [n.name for n in g.nodes if n.attrs.get("reason")]  # no node left without a rule
    for batch in (2, 3):
        xb = torch.randn(batch, 3, 5, 7)
        with torch.no_grad():
            torch.testing.assert_close(Interpreter(g).run([xb]).outputs[0], module(xb), rtol=1e-5, atol=1e-6)
    result = optimize(g, sparsity=0.5, method="synflow")  # paths move through the rolls as values do
    assert all(p.mask is not None for p in result.graph.prunable_params())
