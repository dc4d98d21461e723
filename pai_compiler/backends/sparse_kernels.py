"""Exact sparse kernels for conv/linear layers: ``y = W_csr @ taps(x) + b`` over the used taps only.

A 2-D convolution is a matrix product over im2col columns, ``y[o, p] = sum_c W[o, c] X[c, p]``
with ``c = (channel, kh, kw)``. A column of ``W`` that is zero in every row (a *tap* no kept
weight reads) contributes nothing, so only the used taps are gathered from the padded input
(one strided view, one index) and multiplied by the CSR (or, on CUDA, BSR) matrix of the kept
weights: ``O(nnz * positions + used_taps * positions)`` work instead of
``O(out * in * k * k * positions)``. A 1×1 convolution is the same product with one tap per
channel; a linear layer is ``y^T = W_csr @ x[:, used]^T``. Every kernel is an ``nn.Module`` with
buffers only, so a model holding them pickles (``torch.save``) and moves (``.to(device)``).
"""
from __future__ import annotations

import warnings

import torch  # a module class needs nn.Module at import time (like pai_compiler.interp)
import torch.nn.functional as F
from torch import nn

__all__ = ["SparseConv2d", "SparseLinear", "dense_conv", "pad_spatial", "SPARSE_LAYOUTS"]

#: layouts a kernel can hold its weight in; ``bsr`` needs widths divisible by its block
SPARSE_LAYOUTS = ("csr", "bsr")
BSR_BLOCK = 16


def pad_spatial(x: torch.Tensor, pads: list[int]) -> torch.Tensor:
    """Zero-pad the spatial axes by ONNX ``pads`` (all begins, then all ends)."""
    n = len(pads) // 2
    if not any(pads):
        return x
    flat: list[int] = []
    for i in reversed(range(n)):
        flat += [pads[i], pads[i + n]]
    return F.pad(x, flat)


def dense_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pads: list[int],
               strides: list[int], dilations: list[int], groups: int) -> torch.Tensor:
    """The dense convolution, symmetric padding passed to the kernel (no padded copy)."""
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 2]
    n = len(pads) // 2
    if pads[:n] == pads[n:]:
        return conv(x, weight, bias, stride=strides, padding=pads[:n], dilation=dilations, groups=groups)
    return conv(pad_spatial(x, pads), weight, bias, stride=strides, dilation=dilations, groups=groups)


def _sparse_matrix(dense: torch.Tensor, layout: str) -> torch.Tensor:
    with warnings.catch_warnings():  # torch flags its sparse compressed layouts as beta on every conversion
        warnings.simplefilter("ignore", UserWarning)
        if layout == "csr":
            return dense.to_sparse_csr()
        if layout == "bsr":
            return dense.to_sparse_bsr((BSR_BLOCK, BSR_BLOCK))
    raise ValueError(f"unknown sparse layout {layout!r} (expected one of {SPARSE_LAYOUTS})")


def _sparse_times(matrix: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    return torch.sparse.mm(matrix, dense) if matrix.layout == torch.sparse_csr else matrix @ dense


def layout_fits(layout: str, rows: int, cols: int) -> bool:
    """Whether a ``rows × cols`` weight can be held in ``layout`` (BSR needs whole blocks)."""
    return layout == "csr" or (rows % BSR_BLOCK == 0 and cols % BSR_BLOCK == 0)


class SparseConv2d(nn.Module):
    """A groups=1 2-D convolution as ``W_used (sparse) @ used taps of the padded input``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pads: list[int], strides: list[int],
                 dilations: list[int], layout: str = "csr") -> None:
        super().__init__()
        if weight.dim() != 4:
            raise ValueError(f"SparseConv2d needs a 4-d weight, got shape {tuple(weight.shape)}")
        used = (weight != 0).any(0).nonzero()
        if used.shape[0] == 0:
            raise ValueError("SparseConv2d: the weight has no nonzero entry")
        self.out_channels, self.in_channels, self.kh, self.kw = (int(d) for d in weight.shape)
        self.pads, self.strides, self.dilations = list(pads), list(strides), list(dilations)
        self.register_buffer("tap_channel", used[:, 0].contiguous())
        self.register_buffer("tap_row", used[:, 1].contiguous())
        self.register_buffer("tap_col", used[:, 2].contiguous())
        kept = weight[:, used[:, 0], used[:, 1], used[:, 2]].contiguous()
        self.register_buffer("weight", _sparse_matrix(kept, layout))
        self.register_buffer("bias", None if bias is None else bias.detach().reshape(-1, 1).clone())

    @property
    def used_taps(self) -> int:
        return int(self.tap_channel.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = pad_spatial(x, self.pads).contiguous()
        batch, channels, height, width = padded.shape
        (sh, sw), (dh, dw) = self.strides, self.dilations
        out_h = (height - dh * (self.kh - 1) - 1) // sh + 1
        out_w = (width - dw * (self.kw - 1) - 1) // sw + 1
        sn, sc, sy, sx = padded.stride()
        # (channel, kh, kw, batch, out_h, out_w) view of every im2col entry, then only the used taps
        windows = padded.as_strided((channels, self.kh, self.kw, batch, out_h, out_w), (sc, sy * dh, sx * dw, sn, sy * sh, sx * sw))
        taps = windows[self.tap_channel, self.tap_row, self.tap_col].reshape(self.used_taps, -1)
        y = _sparse_times(self.weight, taps)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(self.out_channels, batch, out_h, out_w).transpose(0, 1).contiguous()


class SparseLinear(nn.Module):
    """``alpha * x W^T + beta * b`` as ``(W_used (sparse) @ x[..., used]^T)^T``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, alpha: float = 1.0, beta: float = 1.0,
                 layout: str = "csr") -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear needs a 2-d weight, got shape {tuple(weight.shape)}")
        used = (weight != 0).any(0).nonzero().reshape(-1)
        if used.numel() == 0:
            raise ValueError("SparseLinear: the weight has no nonzero entry")
        self.out_features, self.in_features = (int(d) for d in weight.shape)
        self.alpha, self.beta = float(alpha), float(beta)
        self.all_columns = used.numel() == self.in_features
        self.register_buffer("columns", used.contiguous())
        self.register_buffer("weight", _sparse_matrix(weight[:, used].contiguous(), layout))
        self.register_buffer("bias", None if bias is None else bias.detach().reshape(-1).clone())

    @property
    def used_columns(self) -> int:
        return int(self.columns.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        picked = rows.t() if self.all_columns else rows.index_select(1, self.columns).t()
        y = _sparse_times(self.weight, picked.contiguous()).t()
        if self.alpha != 1.0:
            y = y * self.alpha
        if self.bias is not None:
            y = y + self.beta * self.bias
        return y.contiguous().reshape(*lead, self.out_features)
