"""Plain 2-D window pools for the compiled forward; max as separable strided maxima ``max_j max_i x[i + s_h r, j + s_w c]``.

torch's max-pool kernel on one thread is fast on channels_last tensors and 10-30× slower on
contiguous (NCHW) ones (ResNet/VGG shapes, batch 1 and 16; see ``docs/sparse_speed.md``). A max
over a window is a max over its rows of the max over its columns, so an unpadded, undilated pool
is ``kh - 1`` elementwise maxima of strided row views followed by ``kw - 1`` of column views:
exact (a max rounds nothing) and layout-agnostic. Channels_last inputs keep torch's kernel. An
unpadded average pool is ``F.avg_pool2d`` itself (the interpreter's rule also counts the window
cells of a padded border, three more ops per call).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch  # the pool is torch calls (this module is imported with sparse_plan)
import torch.nn.functional as F

__all__ = ["window_pool_2d"]


def _strided_max(x: torch.Tensor, axis: int, kernel: int, stride: int, out: int) -> torch.Tensor:
    """``max_i x[..., i + stride * r, ...]`` along ``axis`` for ``r < out``, ``i < kernel``."""
    span = (out - 1) * stride + 1
    result = x.narrow(axis, 0, span)[(slice(None),) * axis + (slice(None, None, stride),)]
    for offset in range(1, kernel):
        view = x.narrow(axis, offset, span)[(slice(None),) * axis + (slice(None, None, stride),)]
        result = torch.maximum(result, view)
    return result


def window_pool_2d(attrs: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The pool of a windowed 2-d max or average pool node's ``attrs`` (None where padding,
    dilation or ceil_mode make it more than a plain window: the interpreter's rule runs those)."""
    kernel, strides = list(attrs.get("kernel_shape", [])), list(attrs.get("strides", []))
    if attrs.get("mode") not in ("max", "avg") or attrs.get("reduce") or len(kernel) != 2 or len(strides) != 2:
        return None
    if any(attrs.get("pads", [0] * 4)) or any(d != 1 for d in attrs.get("dilations", [1, 1])) or attrs.get("ceil_mode"):
        return None
    if attrs["mode"] == "avg":
        return lambda x: F.avg_pool2d(x, kernel, strides)
    (kh, kw), (sh, sw) = kernel, strides

    def pool(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return F.max_pool2d(x, kernel, strides)
        out_h, out_w = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
        return _strided_max(_strided_max(x, 2, kh, sh, out_h), 3, kw, sw, out_w)
    return pool
