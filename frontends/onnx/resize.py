"""ONNX ``Resize`` (opsets 10-19) and ``Upsample`` (7, 9): the IR attrs and output shape of a nearest/linear resize.

:func:`resize_spec` reads the node's scales (``out = ⌊in · s⌋``, float32 as onnxruntime computes
it; ``⌊in · p / q⌋`` for a symbolic size and a scale ``p / q``) or sizes (constants, or a shape
computation the frontend folded into symbolic dims: ``Floor(H · 1.5)`` is ``floor(1.5·H)``),
``axes`` (opset 18) and the attributes,
and returns the attrs of the opaque ``op="resize"`` node the interpreter evaluates
(:mod:`pai_compiler.interp_resize`). Anything else raises :class:`UnsupportedResize` with the
reason and the user's fix; the caller keeps the node opaque with both.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np

from pai_compiler.frontends.onnx.static import Const, simplify_dim
from pai_compiler.ir import Dim, Value
from pai_compiler.ir.dims import floor_div, is_symbolic, plain

__all__ = ["UnsupportedResize", "resize_spec", "RESIZE_FIX", "scaled_dim"]

RESIZE_FIX = ("paic evaluates nearest and linear resizes only: re-export with mode='nearest' or 'bilinear' (no antialias), "
              "or prune with a criterion that runs no forward pass (magnitude, random, random-erk)")


#: what :mod:`pai_compiler.interp_resize` evaluates ("simple": onnxruntime's nearest for Resize-10 and Upsample)
COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "half_pixel_symmetric")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil", "simple")


class UnsupportedResize(Exception):
    """A resize paic has no semantics for; ``str(exc)`` is the reason."""


def scaled_dim(size: Dim, scale: float) -> Dim:
    """``⌊size · scale⌋``: float32 for a known size (onnxruntime's), exact rational for a symbolic one."""
    if not is_symbolic(size):
        return int(np.floor(np.float32(int(size)) * np.float32(scale)))
    ratio = Fraction(float(np.float32(scale)))
    return simplify_dim(floor_div(plain(size) * ratio.numerator, ratio.denominator))


def _same(a: Dim, b: Any) -> bool:
    return simplify_dim(plain(a) - plain(b)) == 0


def _static(x: Any, what: str) -> np.ndarray | None:
    if x is None:
        return None
    if not isinstance(x, Const):
        raise UnsupportedResize(f"{what} computed at run time")
    return None if x.array.size == 0 else x.array.reshape(-1)


def _settings(op_type: str, opset: int, attrs: dict[str, Any]) -> dict[str, Any]:
    """mode, coordinate_mode and nearest_mode, checked; Resize-10 and Upsample are asymmetric, onnxruntime's "simple" nearest."""
    mode = {"bilinear": "linear", "trilinear": "linear"}.get(str(attrs.get("mode", "nearest")), str(attrs.get("mode", "nearest")))
    legacy = op_type == "Upsample" or opset < 11
    coordinate_mode = "asymmetric" if legacy else str(attrs.get("coordinate_transformation_mode", "half_pixel"))
    nearest_mode = "simple" if legacy else str(attrs.get("nearest_mode", "round_prefer_floor"))
    if mode not in ("nearest", "linear"):
        raise UnsupportedResize(f"mode {mode!r}")
    if int(attrs.get("antialias", 0)):
        raise UnsupportedResize("antialias=1")
    if coordinate_mode not in COORDINATE_MODES:
        raise UnsupportedResize(f"coordinate_transformation_mode {coordinate_mode!r}")
    if nearest_mode not in NEAREST_MODES:
        raise UnsupportedResize(f"nearest_mode {nearest_mode!r}")
    if str(attrs.get("keep_aspect_ratio_policy", "stretch")) != "stretch":
        raise UnsupportedResize(f"keep_aspect_ratio_policy {attrs['keep_aspect_ratio_policy']!r}")
    return {"mode": mode, "coordinate_mode": coordinate_mode, "nearest_mode": nearest_mode}


def _full(values: np.ndarray, axes: list[int] | None, rank: int, fill: list[Any], what: str) -> list[Any]:
    """``values`` over every axis: the given ``axes`` (opset 18) or all of them; ``fill`` elsewhere."""
    if axes is None:
        if len(values) != rank:
            raise UnsupportedResize(f"{len(values)} {what} for a rank-{rank} input")
        return list(values)
    out = list(fill)
    for axis, v in zip(axes, values):
        out[axis % rank] = v
    return out


def resize_spec(op_type: str, opset: int, x: Value, ins: list[Any], attrs: dict[str, Any]) -> tuple[dict[str, Any], tuple[Dim, ...]]:
    """(the ``op="resize"`` node's attrs, its output shape) for a Resize/Upsample reading ``x``."""
    if x.shape is None or len(x.shape) < 3:
        raise UnsupportedResize("an input that is not N, C, spatial...")
    rank = len(x.shape)
    settings = _settings(op_type, opset, attrs)
    if op_type == "Upsample":
        scales, sizes = (np.asarray(attrs["scales"], dtype=np.float32) if "scales" in attrs else _static(ins[1], "scales")), None
    elif opset < 11:
        scales, sizes = _static(ins[1], "scales"), None
    else:
        scales = _static(ins[2] if len(ins) > 2 else None, "scales")
        sizes = _static(ins[3] if len(ins) > 3 else None, "sizes")
    axes = [int(a) for a in attrs["axes"]] if attrs.get("axes") is not None else None
    if scales is not None:
        full = [float(np.float32(s)) for s in _full(scales.astype(np.float32), axes, rank, [1.0] * rank, "scales")]
        if full[0] != 1.0 or full[1] != 1.0:
            raise UnsupportedResize(f"scales {full} resize the batch or channel axis")
        shape = (*x.shape[:2], *(scaled_dim(d, s) for d, s in zip(x.shape[2:], full[2:])))
        return {**settings, "scales": full[2:]}, shape
    if sizes is None:
        raise UnsupportedResize("neither scales nor sizes")
    target = _full(sizes, axes, rank, list(x.shape), "sizes")
    if not (_same(x.shape[0], target[0]) and _same(x.shape[1], target[1])):
        raise UnsupportedResize(f"sizes {target} resize the batch or channel axis")
    return {**settings, "scales": None}, (*x.shape[:2], *(simplify_dim(d) for d in target[2:]))
