"""Shape helpers of the channel-level tape: live conv taps, broadcast reductions, chan-pool factors.

A conv tap is *live* if it reads at least one real (unpadded) input pixel at some output
position; dead taps count zero in the channel-level path count, as they do per pixel.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from pai_compiler.ir import Graph, Node, OpKind, Param

__all__ = ["conv_tap_live", "dead_taps", "reduction", "chan_pool_factor"]


def conv_tap_live(node: Node, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> np.ndarray:
    """Bool per tap (row-major over the kernel): does it ever read a real input pixel?"""
    kernel = node.params["weight"].shape[2:]
    pads, strides, dil = node.attrs["pads"], node.attrs["strides"], node.attrs["dilations"]
    live = np.ones((), dtype=bool)
    for a, k in enumerate(kernel):
        pos = np.arange(out_shape[2 + a])[:, None] * strides[a] - pads[a] + np.arange(k)[None, :] * dil[a]
        live = np.logical_and.outer(live, ((pos >= 0) & (pos < in_shape[2 + a])).any(axis=0))
    return live.reshape(-1)


def dead_taps(graph: Graph, params: list[Param], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Per conv weight: which taps ever read a real input pixel (only weights with dead taps)."""
    out: dict[str, np.ndarray] = {}
    for p in params:
        live = None
        for node in graph.param_users(p):
            if node.kind is OpKind.CONV and node.params.get("weight") is p:
                here = conv_tap_live(node, shapes[node.inputs[0].name], shapes[node.outputs[0].name])
                live = here if live is None else live | here
        if live is not None and not live.all():
            out[p.name] = live
    return out


def reduction(stored: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Axes to sum a broadcast output gradient over, to get back an input of shape ``stored``."""
    if stored == tuple(out_shape):
        return None
    lead = len(out_shape) - len(stored)
    padded = (1,) * lead + tuple(stored)
    axes = tuple(a for a in range(len(out_shape)) if padded[a] == 1 and out_shape[a] != 1) + tuple(range(lead))
    return tuple(sorted(set(axes))), tuple(stored)


def chan_pool_factor(node: Node, in_shape: tuple[int, ...]) -> float | None:
    """Value factor of a pool acting on a chan vector (1 for mean/max, area for sum), or None."""
    a = node.attrs
    if a.get("reduce"):
        axes = [ax % len(in_shape) for ax in a["axes"]]
        if any(ax < 2 for ax in axes):
            return None
        return float(math.prod(in_shape[ax] for ax in axes)) if a["mode"] == "sum" else 1.0
    return float(math.prod(a["kernel_shape"])) if a["mode"] == "sum" else 1.0
