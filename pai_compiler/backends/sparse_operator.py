"""A convolution as one sparse matrix on the flattened image: ``y_flat = T x_flat + b``.

On a fixed input shape a convolution is a linear map from the flattened input ``(C, *spatial)``
to the flattened output ``(O, *out_spatial)``. Its matrix ``T`` has one entry per (kept weight,
output position whose window reads inside the input): ``T[o * P_out + p, c * P_in + q] =
W[o, c - g * I_g, k]`` with ``q = p * stride - pad_begin + k * dilation`` (groups, strides,
dilations and asymmetric padding all land in the index arithmetic; padding reads are simply
absent). ``T`` holds ``nnz(W) * P_out`` entries at most, so the form pays where the maps are small
(the deep layers of a CNN): one CSR matrix-vector (batch 1) or matrix-matrix product per call,
no padding, no im2col, no layout change. The matrix is built once per input shape
(``OPERATOR_LIMIT`` entries at most) and travels with the pickled kernel.
"""
from __future__ import annotations

import math
import warnings
import torch  # a module class needs nn.Module at import time (like pai_compiler.interp)
from torch import nn

__all__ = ["ConvOperator", "operator_entries", "OPERATOR_LIMIT"]

#: most entries of a conv's matrix (int32 columns + float values: 32 MiB)
OPERATOR_LIMIT = 1 << 22


def _out_size(size: int, kernel: int, pad_begin: int, pad_end: int, stride: int, dilation: int) -> int:
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


def operator_entries(weight: torch.Tensor, in_spatial: tuple[int, ...], pads: list[int], strides: list[int],
                     dilations: list[int]) -> int:
    """An upper bound of ``T``'s entries: kept weights times output positions."""
    dims = len(in_spatial)
    out = [_out_size(in_spatial[a], int(weight.shape[2 + a]), pads[a], pads[a + dims], strides[a], dilations[a]) for a in range(dims)]
    return int((weight != 0).sum()) * math.prod(out)


def _csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix from unique (row, col) entries (int32 indices where they fit: MKL's faster path)."""
    order = torch.argsort(rows * shape[1] + cols)
    rows, cols, values = rows[order], cols[order], values[order]
    index = torch.int32 if max(shape) < 2**31 - 1 and values.numel() < 2**31 - 1 else torch.int64
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    with warnings.catch_warnings():  # torch flags its sparse compressed layouts as beta
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow.to(index), cols.to(index), values.contiguous(), shape)


class ConvOperator(nn.Module):
    """A convolution (1-, 2- or 3-d, any groups, strides, dilations, padding) on inputs of shape
    ``(N, *in_shape)`` as the CSR product ``T @ x_flat`` (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pads: list[int], strides: list[int],
                 dilations: list[int], groups: int, in_shape: tuple[int, ...]) -> None:
        super().__init__()
        dims = weight.dim() - 2
        if dims < 1 or len(in_shape) != dims + 1:
            raise ValueError(f"ConvOperator: weight {tuple(weight.shape)} does not fit an input of shape {tuple(in_shape)}")
        self.in_shape = tuple(int(d) for d in in_shape)
        self.out_channels = int(weight.shape[0])
        spatial = self.in_shape[1:]
        self.out_spatial = tuple(_out_size(spatial[a], int(weight.shape[2 + a]), pads[a], pads[a + dims], strides[a], dilations[a])
                                 for a in range(dims))
        out_flat, in_flat = self.out_channels * math.prod(self.out_spatial), math.prod(self.in_shape)
        self.register_buffer("matrix", self._matrix(weight, pads, strides, dilations, groups, (out_flat, in_flat)))
        per_position = None if bias is None else bias.detach().reshape(-1).repeat_interleave(math.prod(self.out_spatial))
        self.register_buffer("bias", per_position)
        self.in_size = torch.Size(self.in_shape)  # what a call compares its input with (a cheap check: calls are µs)
        self.single_shape = (1, self.out_channels, *self.out_spatial)

    def _matrix(self, weight: torch.Tensor, pads: list[int], strides: list[int], dilations: list[int], groups: int,
                shape: tuple[int, int]) -> torch.Tensor:
        dims, spatial = weight.dim() - 2, self.in_shape[1:]
        kept = weight.detach().nonzero()  # (nnz, 2 + dims): out channel, group-local in channel, kernel offsets
        values = weight.detach()[tuple(kept.t())]
        device = weight.device
        out_pos = torch.cartesian_prod(*[torch.arange(n, device=device) for n in self.out_spatial]).reshape(-1, dims)
        # input coordinate of (kept weight, output position), per spatial axis: p * stride - pad_begin + k * dilation
        coords = [out_pos[None, :, a] * strides[a] - pads[a] + kept[:, None, 2 + a] * dilations[a] for a in range(dims)]
        inside = torch.ones(coords[0].shape, dtype=torch.bool, device=device)
        in_flat = torch.zeros(coords[0].shape, dtype=torch.int64, device=device)
        out_flat = torch.zeros(out_pos.shape[0], dtype=torch.int64, device=device)
        for a in range(dims):
            inside &= (coords[a] >= 0) & (coords[a] < spatial[a])
            in_flat = in_flat * spatial[a] + coords[a]
            out_flat = out_flat * self.out_spatial[a] + out_pos[:, a]
        out_per_group = self.out_channels // groups
        channel = (kept[:, 0] // out_per_group) * int(weight.shape[1]) + kept[:, 1]
        rows = kept[:, None, 0] * out_pos.shape[0] + out_flat[None, :]
        cols = channel[:, None] * math.prod(spatial) + in_flat
        entries = values[:, None].expand(inside.shape)
        return _csr(rows[inside], cols[inside], entries[inside], shape)

    @property
    def entries(self) -> int:
        return int(self.matrix.values().numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers  # read once: a call of a small layer costs tens of µs, nn.Module lookups count
        matrix, bias = buffers["matrix"], buffers["bias"]
        if x.shape[1:] != self.in_size:
            raise ValueError(f"ConvOperator was built for inputs (N, {', '.join(map(str, self.in_shape))}), got {tuple(x.shape)}")
        batch = x.shape[0]
        if batch == 1:
            y = torch.mv(matrix, x.reshape(-1))
            return (y if bias is None else y.add_(bias)).view(self.single_shape)
        y = torch.sparse.mm(matrix, x.reshape(batch, -1).t().contiguous())
        if bias is not None:
            y = y.add_(bias[:, None])
        return y.t().reshape(batch, self.out_channels, *self.out_spatial)

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, out_spatial={self.out_spatial}, entries={self.entries}"
