"""Resize (ONNX ``Resize``/``Upsample``, torch ``interpolate``): per spatial axis, which input rows each output row reads and with what weight.

An opaque node with ``op="resize"`` resizes the spatial axes (2...) of an ``N, C, ...`` tensor.
Per axis of input size ``L`` and output size ``R`` (scale ``s`` = ``attrs["scales"][i]``, or
``R / L`` when the sizes were given), output index ``j`` maps to the input coordinate ``x``
(``coordinate_mode``): ``asymmetric`` ``j / s``; ``half_pixel`` ``(j + ½) / s - ½``;
``pytorch_half_pixel`` the same, 0 when ``R = 1``; ``align_corners`` ``j (L - 1) / (R - 1)``, 0
when ``R = 1``; ``half_pixel_symmetric`` ``L/2 (1 - R / (s L)) + (j + ½) / s - ½``. ``nearest``
reads ``clamp(round(x))`` (``nearest_mode``: round_prefer_floor, round_prefer_ceil (``x`` within
a float32 ulp of a half is a tie, as onnxruntime rounds), floor,
ceil, or ``simple``: ceil when ``s < 1``, else truncation, Resize-10 and Upsample as
onnxruntime runs them). ``linear`` clamps ``x`` to ``[0, L - 1]`` and reads ``i0 = ⌊x⌋``,
``i1 = min(i0 + 1, L - 1)`` with weights ``1 - (x - i0)`` and ``x - i0`` (one read of weight 1
when ``i0 = i1``). Coordinates are float32, as onnxruntime computes them. An N-d linear resize
is the product of its axes' weights, so the rules apply one axis at a time. The torch frontends
set ``torch_coordinates``: ``x = j · r`` (``(j + ½) · r - ½``, ``j (L - 1) / (R - 1)`` as one
float32 step) with ``r = 1 / scale_factor`` or ``L / R``, as ``F.interpolate`` computes it.

Real: ``out[j] = Σ_k w_k[j] · in[i_k[j]]`` per axis. Paths: ``out[j] = Σ_k [w_k[j] > 0] · in[i_k[j]]``,
the input elements read with a nonzero coefficient, each edge of the unrolled graph counting 1.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from pai_compiler.errors import PaicError
from pai_compiler.interp_rules import RuleContext
from pai_compiler.ir import Node

__all__ = ["axis_taps", "resize", "path_resize"]

Taps = tuple[tuple[np.ndarray, np.ndarray], ...]  # per read: (input index, weight) for every output index


def _coordinates(in_size: int, out_size: int, scale: np.float32, coordinate_mode: str) -> np.ndarray:
    """The input coordinate of every output index (float32, onnxruntime's order of operations)."""
    j = np.arange(out_size, dtype=np.float32)
    half = np.float32(0.5)
    if scale == np.float32(1) and out_size == in_size:
        return j
    if coordinate_mode == "asymmetric":
        return j / scale
    if coordinate_mode == "align_corners":
        return np.zeros_like(j) if out_size == 1 else j * np.float32(in_size - 1) / np.float32(out_size - 1)
    if coordinate_mode == "pytorch_half_pixel" and out_size == 1:
        return np.zeros_like(j)
    if coordinate_mode == "half_pixel_symmetric":
        adjustment = np.float32(out_size) / (scale * np.float32(in_size))
        offset = np.float32(in_size) / np.float32(2) * (np.float32(1) - adjustment)
        return ((offset + (j + half) / scale) - half).astype(np.float32)
    if coordinate_mode not in ("half_pixel", "pytorch_half_pixel"):
        raise PaicError(f"resize: coordinate_transformation_mode {coordinate_mode!r} is not supported")
    return ((j + half) / scale - half).astype(np.float32)


def _nearest(x: np.ndarray, nearest_mode: str, scale: np.float32) -> np.ndarray:
    wide = x.astype(np.float64)  # exact for float32 values: no rounding in the +0.5
    if nearest_mode == "floor":
        return np.floor(wide)
    if nearest_mode == "ceil":
        return np.ceil(wide)
    if nearest_mode == "simple":
        return np.ceil(wide) if scale < 1 else np.trunc(wide)
    if nearest_mode in ("round_prefer_ceil", "round_prefer_floor"):
        # a coordinate within one float32 ulp of a half is a tie, as onnxruntime rounds (2 / float32(4/7) = 3.4999998: 3.5)
        tie = np.abs(wide - (np.floor(wide) + 0.5)) <= np.spacing(np.abs(x).astype(np.float32)).astype(np.float64)
        nearest = np.floor(wide + 0.5)
        return np.where(tie, np.floor(wide) + (nearest_mode == "round_prefer_ceil"), nearest)
    raise PaicError(f"resize: nearest_mode {nearest_mode!r} is not supported")


def _torch_coordinates(in_size: int, out_size: int, scale: float | None, coordinate_mode: str) -> np.ndarray:
    """torch's source coordinates (``area_pixel_compute_source_index``): the output index times
    the inverse scale, ``1 / scale_factor`` when the kernel got one, else ``in / out``."""
    j = np.arange(out_size, dtype=np.float32)
    if coordinate_mode == "align_corners":
        step = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
        return (j * step).astype(np.float32)
    inverse = np.float32(1.0 / scale) if scale is not None else np.float32(in_size) / np.float32(out_size)
    if coordinate_mode == "asymmetric":
        return j if out_size == in_size else (j * inverse).astype(np.float32)
    return (inverse * (j + np.float32(0.5)) - np.float32(0.5)).astype(np.float32)


@lru_cache(maxsize=256)
def axis_taps(in_size: int, out_size: int, scale: float | None, mode: str, coordinate_mode: str, nearest_mode: str, torch_coordinates: bool = False) -> Taps:
    """The reads of one axis: ``(index, weight)`` arrays over the output indices (one for nearest, two for linear).
    ``scale`` None: the sizes were given (ONNX: ``out / in``)."""
    s = np.float32(scale) if scale is not None else np.float32(out_size) / np.float32(in_size)
    x = _torch_coordinates(in_size, out_size, scale, coordinate_mode) if torch_coordinates else _coordinates(in_size, out_size, s, coordinate_mode)
    if mode == "nearest":
        index = np.clip(_nearest(x, nearest_mode, s), 0, in_size - 1).astype(np.int64)
        return ((index, np.ones(out_size, dtype=np.float32)),)
    if mode != "linear":
        raise PaicError(f"resize: mode {mode!r} is not supported")
    x = np.clip(x, np.float32(0), np.float32(in_size - 1))
    first = np.minimum(x.astype(np.int64), in_size - 1)
    second = np.minimum(first + 1, in_size - 1)
    frac = (x - first.astype(np.float32)).astype(np.float32)
    same = first == second  # the last row (or a one-row input): one read of weight 1
    w_first = np.where(same, np.float32(1), np.float32(1) - frac).astype(np.float32)
    w_second = np.where(same, np.float32(0), frac).astype(np.float32)
    return ((first, w_first), (second, w_second))


def _apply(it: RuleContext, node: Node, args: list[torch.Tensor], *, paths: bool) -> torch.Tensor:
    a, x = node.attrs, args[0]
    out_shape = it.dims(node.outputs[0].shape)
    if x.dim() != len(out_shape) or x.dim() < 3:
        raise PaicError(f"node {node.name!r}: resize needs an N, C, spatial... input of the output's rank {len(out_shape)}")
    for axis in range(2, x.dim()):
        in_size, out_size = int(x.shape[axis]), int(out_shape[axis])
        scale = None if a.get("scales") is None else float(a["scales"][axis - 2])
        taps = axis_taps(in_size, out_size, scale, a["mode"], a["coordinate_mode"], a.get("nearest_mode", "round_prefer_floor"), bool(a.get("torch_coordinates")))
        view = [1] * x.dim()
        view[axis] = out_size
        total: torch.Tensor | None = None
        for index, weight in taps:
            if not weight.any():
                continue
            coefficient = (weight > 0).astype(np.float32) if paths else weight
            read = x.index_select(axis, torch.as_tensor(index, device=x.device))
            term = read if bool((coefficient == 1).all()) else read * torch.as_tensor(coefficient, dtype=x.dtype, device=x.device).view(view)
            total = term if total is None else total + term
        assert total is not None  # the first read of every axis has a nonzero weight somewhere
        x = total
    return x


def resize(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """The resize's real output: per spatial axis, the weighted sum of the rows it reads."""
    return [_apply(it, node, args, paths=False)]


def path_resize(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """Paths: each output element sums the paths of the input elements it reads with a nonzero coefficient."""
    return [_apply(it, node, args, paths=True)]
