"""ONNX ``ConvTranspose``: the IR attrs and output spatial dims of a ``conv_transpose`` node.

Per spatial axis, with the full size ``full = stride·(in - 1) + dil·(k - 1) + 1``:
``out = full + output_padding - pad_begin - pad_end``. Explicit ``pads`` (``auto_pad`` NOTSET) are
used as given; ``auto_pad=VALID`` is no padding. With ``output_shape`` (which overrides ``pads``) or
``auto_pad=SAME_*`` (``out = in·stride``) the total padding ``t = full + output_padding - out`` is
split as the ONNX spec and onnxruntime split it: SAME_UPPER puts the odd one at the end, otherwise at the begin.
Anything else (a negative total, symbolic sizes where a split is needed) is a ``ModelError``
naming the node and the fix.
"""
from __future__ import annotations

from typing import Any

from pai_compiler.errors import ModelError
from pai_compiler.frontends.onnx.static import simplify_dim
from pai_compiler.ir import Dim
from pai_compiler.ir.dims import plain

__all__ = ["conv_transpose_spec"]

_FIX = "re-export with explicit pads and output_padding (torch's ConvTranspose without output_size does)"


def conv_transpose_spec(attrs: dict[str, Any], spatial: tuple[Dim, ...] | None, kernel: list[int], label: str) -> tuple[dict[str, Any], tuple[Dim, ...] | None]:
    """(IR attrs, output spatial dims or None when the input shape is unknown) of a ConvTranspose."""
    n = len(kernel)
    strides = [int(s) for s in attrs.get("strides", [1] * n)]
    dil = [int(d) for d in attrs.get("dilations", [1] * n)]
    extra = [int(a) for a in attrs.get("output_padding", [0] * n)]
    auto = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    if auto not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise ModelError(f"node {label!r}: ConvTranspose auto_pad={auto!r} is unknown; {_FIX}")
    if any(e >= max(s, d) for e, s, d in zip(extra, strides, dil)):
        raise ModelError(f"node {label!r}: ConvTranspose output_padding {extra} must be smaller than stride or dilation; {_FIX}")
    wanted = [int(o) for o in attrs.get("output_shape", [])][-n:] if attrs.get("output_shape") else None
    if wanted is None and auto in ("NOTSET", "VALID"):
        pads = [int(p) for p in attrs.get("pads", [0] * 2 * n)] if auto == "NOTSET" else [0] * 2 * n
    else:
        pads = _split_total(spatial, kernel, strides, dil, extra, wanted, auto, label)
    ir_attrs = {"strides": strides, "pads": pads, "dilations": dil, "output_padding": extra, "kernel_shape": list(kernel),
                "groups": int(attrs.get("group", 1))}
    if spatial is None:
        return ir_attrs, None
    out = tuple(simplify_dim(plain(spatial[i]) * strides[i] - strides[i] + dil[i] * (kernel[i] - 1) + 1 + extra[i] - pads[i] - pads[i + n])
                for i in range(n))
    return ir_attrs, out


def _split_total(spatial: tuple[Dim, ...] | None, kernel: list[int], strides: list[int], dil: list[int], extra: list[int],
                 wanted: list[int] | None, auto: str, label: str) -> list[int]:
    """Begin and end pads from the output size ``output_shape`` gives or ``SAME_*`` implies."""
    n = len(kernel)
    if spatial is None or not all(isinstance(s, int) for s in spatial):
        raise ModelError(f"node {label!r}: ConvTranspose with output_shape/auto_pad={auto} needs static spatial sizes; {_FIX}")
    pads = [0] * 2 * n
    for i in range(n):
        size = int(spatial[i])  # type: ignore[arg-type]
        out = wanted[i] if wanted is not None else size * strides[i]
        total = strides[i] * (size - 1) + dil[i] * (kernel[i] - 1) + 1 + extra[i] - out
        if total < 0:
            raise ModelError(f"node {label!r}: ConvTranspose output size {out} exceeds the full transposed conv on axis {i}; {_FIX}")
        small, big = total // 2, total - total // 2
        pads[i], pads[i + n] = (small, big) if auto == "SAME_UPPER" else (big, small)
    return pads
