"""Float dtypes of IR values and constants: ``float_eps(dtype)``, the machine epsilon of a numpy or
ml_dtypes float (bfloat16, float8_*), None for a non-float; the tolerance of every constant match.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["float_eps"]


def float_eps(dtype: Any) -> float | None:
    """Machine epsilon of a float dtype, numpy's or ml_dtypes' (bfloat16, float8_*, ...: numpy
    kind ``V``); None for anything that is not a float type."""
    try:
        dt: np.dtype[Any] | None = np.dtype(dtype)
    except TypeError:
        dt = None  # a name only ml_dtypes teaches numpy ("bfloat16")
    if dt is not None and dt.kind in "fc":
        return float(np.finfo(dt).eps)
    if dt is not None and dt.kind != "V":
        return None
    try:
        import ml_dtypes  # heavy (~0.3 s), only for its low-precision floats; registers their names
    except ImportError:  # onnx needs ml_dtypes, so this is only a safety net
        return None
    try:
        return float(ml_dtypes.finfo(np.dtype(dtype)).eps)
    except (TypeError, ValueError):
        return None
