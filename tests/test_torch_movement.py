"""torch frontend data movement and aliases: ``torch.roll`` (Swin's shifted windows), ``masked_fill``, constants expanded over the batch, arithmetic aliases."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pai_compiler.api import optimize
from pai_compiler.frontends.torch.spec import lower_module
from pai_compiler.interp import Interpreter
from pai_compiler.ir import Graph


def _matches_eager(g: Graph, module: nn.Module, rest: tuple[int, ...], batches: tuple[int, ...], atol: float = 1e-6) -> None:
    """The lowered graph computes what the module computes, on random inputs (batch, *rest) at each batch."""
    for batch in batches:
        x = torch.randn(batch, *rest)
        with torch.no_grad():
            torch.testing.assert_close(Interpreter(g).run([x]).outputs[0], module(x), rtol=1e-5, atol=atol)


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
    _matches_eager(g, module, (3, 5, 7), (2, 3))
    result = optimize(g, sparsity=0.5, method="synflow")  # paths move through the rolls as values do
    assert all(p.mask is not None for p in result.graph.prunable_params())


class _WindowMask(nn.Module):
    """Swin's shifted-window mask: a (windows, s, s) buffer expanded over the batch and reshaped to
    (batch * windows, 1, s, s), added to per-window scores."""

    def __init__(self, windows: int = 3, s: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(5, s)
        self.register_buffer("mask", torch.randn(windows, s, s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, windows * s, 5)
        windows, s = self.mask.shape[0], self.mask.shape[1]
        h = self.proj(x).reshape(-1, s, s)  # (batch * windows, s, s)
        scores = (h @ h.transpose(1, 2)).unsqueeze(1)
        mask = self.mask.unsqueeze(1).unsqueeze(0).expand(x.shape[0], -1, -1, -1, -1).reshape(-1, 1, s, s)
        return (scores + mask).softmax(-1)


def test_a_constant_expanded_over_the_batch_then_reshaped_stays_right_at_every_batch() -> None:
    torch.manual_seed(0)
    module = _WindowMask().eval()
    g = lower_module(module, torch.randn(2, 12, 5), "export")
    _matches_eager(g, module, (12, 5), (2, 3, 1))


class _CastExpanded(nn.Module):
    """Buffers expanded over the batch, then cast (Funnel's ``type_as`` of its position features)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.register_buffer("positions", torch.arange(6).view(1, 6))
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 6).view(1, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) * self.positions.expand(x.shape[0], -1).to(torch.float32)
        return h * self.scale.expand(x.shape[0], -1).type_as(h)


def test_a_cast_of_a_constant_expanded_over_the_batch_stays_a_constant() -> None:
    torch.manual_seed(0)
    module = _CastExpanded().eval()
    g = lower_module(module, torch.randn(2, 6), "export")
    _matches_eager(g, module, (6,), (2, 3))


class _Aliases(nn.Module):
    """torch's spelled-out arithmetic aliases (ConvBERT's ``torch.multiply``): multiply, divide, subtract, true_divide."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, g = self.a(x), self.b(x)
        y = torch.multiply(h, g).subtract(h)
        return torch.true_divide(torch.divide(y, 2.0), g.abs() + 1.0)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_arithmetic_aliases_lower(frontend: str) -> None:
    torch.manual_seed(0)
    module = _Aliases().eval()
    g = lower_module(module, torch.randn(2, 4), frontend)
    assert not [n.name for n in g.nodes if n.attrs.get("reason")]
    _matches_eager(g, module, (4,), (3,))


class _RolledBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 5)
        self.register_buffer("table", torch.arange(10.0).view(2, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + torch.roll(self.table, 2, 1)[:1]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_roll_of_a_constant_folds(frontend: str) -> None:
    torch.manual_seed(0)
    module = _RolledBuffer().eval()
    g = lower_module(module, torch.randn(2, 5), frontend)
    _matches_eager(g, module, (5,), (3,))


class _RepeatedBias(nn.Module):
    """Bloom's alibi: a (heads, 1, seq) constant ``repeat``ed over the batch, added to (batch*heads, seq, seq) scores."""

    def __init__(self, heads: int = 2, seq: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(3, heads * seq)
        self.register_buffer("bias", torch.randn(heads, 1, seq))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, seq, 3)
        heads, seq = self.bias.shape[0], self.bias.shape[2]
        scores = self.proj(x).view(x.shape[0], seq, heads, seq).transpose(1, 2).reshape(-1, seq, seq)
        return (scores + self.bias.repeat(x.shape[0], 1, 1)).softmax(-1)


def test_a_constant_repeated_over_the_batch_stays_right_at_every_batch() -> None:
    torch.manual_seed(0)
    module = _RepeatedBias().eval()
    g = lower_module(module, torch.randn(2, 4, 3), "export")
    _matches_eager(g, module, (4, 3), (2, 3, 1))


class _Composites(nn.Module):
    """einsum attention (Funnel), repeat_interleave of a count, pixel_shuffle/unshuffle: composite ops
    that torch.export keeps and paic lowers through torch's own decomposition."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 2, 4, 4)
        y = nn.functional.pixel_unshuffle(nn.functional.pixel_shuffle(self.conv(x), 2), 2)  # (batch, 8, 4, 4)
        h = self.proj(y.flatten(2).transpose(1, 2))  # (batch, 16, 8)
        scores = torch.einsum("bqd,bkd->bqk", h, h).softmax(-1)
        out = torch.einsum("bqk,bkd->bqd", scores, h)
        return out.repeat_interleave(2, dim=1)


def test_composite_ops_lower_through_their_decomposition() -> None:
    torch.manual_seed(0)
    module = _Composites().eval()
    g = lower_module(module, torch.randn(2, 2, 4, 4), "export")
    assert not [n.name for n in g.nodes if n.attrs.get("reason")]
    _matches_eager(g, module, (2, 4, 4), (2, 3))
    assert all(p.mask is not None for p in optimize(g, sparsity=0.5, method="synflow").graph.prunable_params())


class _Shuffles(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.up, self.down = nn.PixelShuffle(2), nn.PixelUnshuffle(2)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(self.up(self.conv(x)))
        return self.head(nn.functional.pixel_unshuffle(nn.functional.pixel_shuffle(y, 2), 2))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_pixel_shuffle_modules_and_functions(frontend: str) -> None:
    torch.manual_seed(0)
    module = _Shuffles().eval()
    g = lower_module(module, torch.randn(2, 2, 4, 6), frontend)
    assert not [n.name for n in g.nodes if n.kind.value == "opaque"]
    _matches_eager(g, module, (2, 4, 6), (3,))


class _ConstantIndex(nn.Module):
    """nn.Unfold (im2col, decomposed into constant-index gathers: ConvBERT) and x[:, idx0, idx1] with
    broadcasting constant index tensors (negative ones included) on adjacent axes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.unfold = nn.Unfold(kernel_size=(3, 1), padding=(1, 0))
        self.register_buffer("rows", torch.tensor([[0], [3], [-1]]))
        self.register_buffer("cols", torch.tensor([1, -2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 2, 5, 4)
        h = self.conv(x)
        picked = h[:, :, self.rows, self.cols]  # (batch, 4, 3, 2)
        return torch.cat([self.unfold(h).flatten(1), picked.flatten(1)], dim=1)


def test_constant_index_tensors_gather_on_merged_axes() -> None:
    torch.manual_seed(0)
    module = _ConstantIndex().eval()
    g = lower_module(module, torch.randn(2, 2, 5, 4), "export")
    assert not [n.name for n in g.nodes if n.attrs.get("reason")]
    _matches_eager(g, module, (2, 5, 4), (2, 3), atol=1e-5)
