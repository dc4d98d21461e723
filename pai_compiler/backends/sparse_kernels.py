"""Exact sparse kernels for conv/linear layers: ``y = W_csr @ taps(x) + b`` over the used taps only.

A 2-D convolution is a matrix product over im2col columns, ``y[o, p] = sum_c W[o, c] X[c, p]``
with ``c = (channel, kh, kw)``. A column of ``W`` that is zero in every row (a *tap* no kept
weight reads) contributes nothing, so only the used taps are gathered from the padded input
(one strided view, one index) and multiplied by the CSR (or, on CUDA, BSR) matrix of the kept
weights: ``O(nnz * positions + used_taps * positions)`` work instead of
``O(out * in * k * k * positions)``. A 1×1 convolution is the same product with one tap per
channel; a linear layer is ``y^T = W_csr @ x[:, used]^T``. Every kernel is an ``nn.Module`` with
buffers only, so a model holding them pickles (``torch.save``) and moves (``.to(device)``).

The *window* gather copies nothing per tap: in the flattened padded NCHW image (H × W per
channel) the used tap ``(c, i, j)`` of image ``b`` reads one contiguous run of length
``run = (out_h - 1) s_h W + (out_w - 1) s_w + 1`` starting at ``b C H W + c H W + i d_h W + j d_w``.
The product is taken over whole runs (``W_csr @ runs``, ``run`` columns per image, some of them
between output positions), and the output is the strided view that keeps position
``(oh, ow)`` at column ``b run + oh s_h W + ow s_w``.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch  # a module class needs nn.Module at import time (like pai_compiler.interp)
import torch.nn.functional as F
from torch import nn

from pai_compiler.interp_rules import pad_spatial

__all__ = ["SparseConv2d", "SparseLinear", "PackedConv2d", "DenseLinear", "dense_conv", "layout_fits", "SPARSE_LAYOUTS", "GATHERS", "INDEX_LIMIT"]

#: layouts a kernel can hold its weight in; ``bsr`` needs widths divisible by its block
SPARSE_LAYOUTS = ("csr", "bsr")
#: how a sparse conv reads its used taps (see SparseConv2d)
GATHERS = ("index", "copy", "window")
#: most entries of a cached tap-offset table (int64: 16 MiB); a bigger gather copies instead
INDEX_LIMIT = 1 << 21
BSR_BLOCK = 16


def dense_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pads: list[int],
               strides: list[int], dilations: list[int], groups: int) -> torch.Tensor:
    """The dense convolution, symmetric padding passed to the kernel (no padded copy)."""
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 2]
    n = len(pads) // 2
    if pads[:n] == pads[n:]:
        return conv(x, weight, bias, stride=strides, padding=pads[:n], dilation=dilations, groups=groups)
    return conv(pad_spatial(x, pads), weight, bias, stride=strides, dilation=dilations, groups=groups)


def _padded_nchw(x: torch.Tensor, pads: list[int]) -> torch.Tensor:
    """``x`` zero-padded as a contiguous NCHW tensor in one copy (padding a channels_last tensor
    and then making it contiguous would copy twice)."""
    if min(pads) < 0 or (not any(pads) and x.is_contiguous()):
        return pad_spatial(x, pads).contiguous()
    top, left, bottom, right = pads
    batch, channels, height, width = x.shape
    padded = x.new_zeros(batch, channels, height + top + bottom, width + left + right)
    padded[:, :, top:top + height, left:left + width] = x
    return padded


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
    """A groups=1 2-D convolution as ``W_used (sparse) @ used taps of the padded input``.

    ``gather`` picks how the used taps are read: ``index`` (one flat ``index_select`` with an
    offset table cached per input shape, up to ``INDEX_LIMIT`` entries; fast on small maps) or
    ``copy`` (the whole im2col view copied, then the used rows; fast on big maps) or ``window``
    (each used tap's rows as contiguous runs of the padded image, see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pads: list[int], strides: list[int],
                 dilations: list[int], layout: str = "csr", gather: str = "index") -> None:
        super().__init__()
        if weight.dim() != 4:
            raise ValueError(f"SparseConv2d needs a 4-d weight, got shape {tuple(weight.shape)}")
        if gather not in GATHERS:
            raise ValueError(f"unknown gather {gather!r} (expected one of {GATHERS})")
        self.out_channels, self.in_channels, self.kh, self.kw = (int(d) for d in weight.shape)
        rows = (weight != 0).any(0).reshape(-1).nonzero().reshape(-1)  # im2col row c*kh*kw + i*kw + j
        if rows.numel() == 0:
            raise ValueError("SparseConv2d: the weight has no nonzero entry")
        self.pads, self.strides, self.dilations, self.gather = list(pads), list(strides), list(dilations), gather
        self.all_taps = rows.numel() == self.in_channels * self.kh * self.kw
        self.register_buffer("tap_rows", rows.contiguous())
        kept = weight.reshape(self.out_channels, -1)[:, rows].contiguous()
        self.register_buffer("weight", _sparse_matrix(kept, layout))
        self.register_buffer("bias", None if bias is None else bias.detach().reshape(-1, 1).clone())
        self._index_cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_index_cache"] = {}  # rebuilt on first use: shape-specific and possibly large
        return state

    @property
    def used_taps(self) -> int:
        return int(self.tap_rows.shape[0])

    def _flat_index(self, padded: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
        key = (tuple(padded.shape), tuple(padded.stride()), out_h, out_w, padded.device)
        index = self._index_cache.get(key)
        if index is None:
            sn, sc, sy, sx = padded.stride()
            (sh, sw), (dh, dw) = self.strides, self.dilations
            rows, taps = self.tap_rows, self.kh * self.kw
            offsets = (rows // taps) * sc + ((rows // self.kw) % self.kh) * dh * sy + (rows % self.kw) * dw * sx
            device = rows.device
            base = (torch.arange(padded.shape[0], device=device)[:, None, None] * sn
                    + torch.arange(out_h, device=device)[None, :, None] * sh * sy
                    + torch.arange(out_w, device=device)[None, None, :] * sw * sx).reshape(-1)
            index = self._index_cache[key] = (offsets[:, None] + base[None, :]).reshape(-1)
        return index

    def _taps(self, padded: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
        batch, channels = padded.shape[:2]
        positions = batch * out_h * out_w
        if self.gather == "index" and self.used_taps * positions <= INDEX_LIMIT:
            flat = padded.as_strided((padded.numel(),), (1,))  # padded is dense (contiguous or channels_last)
            return flat.index_select(0, self._flat_index(padded, out_h, out_w)).view(self.used_taps, positions)
        sn, sc, sy, sx = padded.stride()
        (sh, sw), (dh, dw) = self.strides, self.dilations
        # (channel, kh, kw, batch, out_h, out_w) view of every im2col entry
        windows = padded.as_strided((channels, self.kh, self.kw, batch, out_h, out_w), (sc, sy * dh, sx * dw, sn, sy * sh, sx * sw))
        rows = windows.reshape(channels * self.kh * self.kw, positions)
        return rows if self.all_taps else rows.index_select(0, self.tap_rows)

    def _window_starts(self, padded: torch.Tensor) -> torch.Tensor:
        """Where each (used tap, image) run starts in the flattened padded batch, cached per shape."""
        key = ("window", tuple(padded.shape), padded.device)
        starts = self._index_cache.get(key)
        if starts is None:
            batch, channels, height, width = padded.shape
            rows, taps = self.tap_rows, self.kh * self.kw
            (dh, dw) = self.dilations
            offsets = (rows // taps) * (height * width) + ((rows // self.kw) % self.kh) * dh * width + (rows % self.kw) * dw
            images = torch.arange(batch, device=rows.device) * (channels * height * width)
            starts = self._index_cache[key] = (offsets[:, None] + images[None, :]).reshape(-1)
        return starts

    def _window_forward(self, padded: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
        padded = padded.contiguous()  # the runs are rows of the NCHW image (a no-op after _padded_nchw)
        batch, _, _, width = padded.shape
        (sh, sw) = self.strides
        run = (out_h - 1) * sh * width + (out_w - 1) * sw + 1
        windows = padded.reshape(-1).unfold(0, run, 1)  # row r: the run starting at element r
        taps = windows.index_select(0, self._window_starts(padded)).view(self.used_taps, batch * run)
        y = _sparse_times(self.weight, taps)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.as_strided((batch, self.out_channels, out_h, out_w), (run, batch * run, sh * width, sw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = _padded_nchw(x, self.pads) if self.gather == "window" else pad_spatial(x, self.pads)
        if not (padded.is_contiguous() or padded.is_contiguous(memory_format=torch.channels_last)):
            padded = padded.contiguous()
        batch, _, height, width = padded.shape
        (sh, sw), (dh, dw) = self.strides, self.dilations
        out_h = (height - dh * (self.kh - 1) - 1) // sh + 1
        out_w = (width - dw * (self.kw - 1) - 1) // sw + 1
        if self.gather == "window":
            return self._window_forward(padded, out_h, out_w)
        y = _sparse_times(self.weight, self._taps(padded, out_h, out_w))
        if self.bias is not None:
            y = y + self.bias
        if batch == 1:
            return y.reshape(1, self.out_channels, out_h, out_w)
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


def _onednn_ready(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()


class PackedConv2d(nn.Module):
    """The dense 2-D conv (+ an optional fused ReLU) on CPU through oneDNN with the weight
    reordered once per input shape (``torch.ops.mkldnn._convolution_pointwise``, what inductor
    emits); elsewhere, with ``packed=False`` or while ``torch.jit.trace`` records it (the tracer takes no opaque oneDNN
    tensor), ``F.conv2d``. The packed weight is a cache, rebuilt after unpickling."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pads: list[int], strides: list[int],
                 dilations: list[int], groups: int, relu: bool = False, packed: bool = True) -> None:
        super().__init__()
        if weight.dim() != 4:
            raise ValueError(f"PackedConv2d needs a 4-d weight, got shape {tuple(weight.shape)}")
        self.pads, self.strides, self.dilations, self.groups, self.relu = list(pads), list(strides), list(dilations), groups, relu
        self.packed = packed  # False: always F.conv2d (oneDNN's fixed cost per call loses on tiny layers)
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().reshape(-1).clone())
        self._packed: dict[tuple[Any, ...], torch.Tensor] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_packed"] = {}  # an opaque oneDNN tensor: not picklable, rebuilt on first use
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        symmetric = self.pads[:2] == self.pads[2:]
        if self.packed and symmetric and _onednn_ready(x) and not torch.jit.is_tracing():
            key = (tuple(x.shape), self.weight.data_ptr())
            packed = self._packed.get(key)
            if packed is None:
                packed = self._packed[key] = torch.ops.mkldnn._reorder_convolution_weight(
                    self.weight, self.pads[:2], self.strides, self.dilations, self.groups, list(x.shape))
            return torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, self.pads[:2], self.strides, self.dilations,
                                                           self.groups, "relu" if self.relu else "none", [], "")
        y = dense_conv(x, self.weight, self.bias, self.pads, self.strides, self.dilations, self.groups)
        return F.relu(y) if self.relu else y


class DenseLinear(nn.Module):
    """``alpha * x W^T + beta * b`` with W held contiguous (out, in): no per-call transpose copy."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, alpha: float = 1.0, beta: float = 1.0) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"DenseLinear needs a 2-d weight, got shape {tuple(weight.shape)}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.register_buffer("weight", weight.detach().contiguous().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().reshape(-1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.alpha == 1.0 and self.beta == 1.0:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight)
        if self.alpha != 1.0:
            y = y * self.alpha
        return y if self.bias is None else y + self.beta * self.bias
