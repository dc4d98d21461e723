"""Per prunable Param, path statistics from its effective-weight mask, and residual-shortcut detection.

* DPaI **nodes** = output channels (``out_axis``) with ≥1 effective weight; **kernels** =
  (out, in) pairs with ≥1 effective weight (for linear: each effective weight);
  ``total_nodes`` = output channels. A weight shared by two nodes counts once.
* NPB **nodes** (§4.2) = input channels (``in_axis``, across groups) with ≥1 effective weight
  of every conv that is not a shortcut, plus, for linear layers, inputs + outputs with ≥1
  effective weight.
* A conv is a **shortcut** when its name/origin says ``shortcut``/``downsample`` or when it is
  a 1×1 conv whose output reaches an ``add`` through norm/pointwise nodes only while its input
  also feeds another conv.
* A transposed conv (weight (in, out/groups, k...)) counts as the conv with the same
  input->output channel connections.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pai_compiler.ir import Graph, Node, OpKind, Param

__all__ = ["LayerPaths", "prunable_layers", "layer_stats", "is_shortcut", "output_channels"]

_THROUGH = (OpKind.NORM, OpKind.POINTWISE)


@dataclass(frozen=True)
class LayerPaths:
    """Path statistics of one prunable Param."""

    param: str
    nodes: tuple[str, ...]
    kind: str
    effective: np.ndarray = field(repr=False, compare=False)
    effective_params: int
    effective_nodes: int
    total_nodes: int
    effective_kernels: int
    npb_nodes: int
    shortcut: bool


def prunable_layers(graph: Graph) -> list[tuple[Param, list[Node]]]:
    """Each layer weight once (``graph.layer_params()``: the prunable ones and a tied head kept
    dense; tied weights: one entry), with the layer nodes that use it."""
    layers = {id(p) for p in graph.layer_params()}
    seen: dict[int, tuple[Param, list[Node]]] = {}
    for node in graph.layer_nodes():
        for p in node.params.values():
            if id(p) in layers:
                seen.setdefault(id(p), (p, []))[1].append(node)
    return list(seen.values())


def layer_stats(param: Param, users: list[Node], effective: np.ndarray) -> LayerPaths:
    """The DPaI/NPB counts of one Param from its effective-weight mask (see the module docstring)."""
    oi = param.to_oi(effective)
    n_out = oi.shape[0]
    n_in = oi.shape[1] if param.in_axis is not None else 1
    pairs = oi.reshape(n_out, n_in, -1).any(axis=2)  # (out, in): one pass over the weight
    node = users[0]
    if node.kind is OpKind.CONV_TRANSPOSE:
        pairs = _transposed_pairs(pairs, int(node.attrs.get("groups", 1)))
    n_out = output_channels(param, node)
    per_out = pairs.any(axis=1)
    shortcut = node.kind is OpKind.CONV and is_shortcut(node, param)
    if node.kind in (OpKind.CONV, OpKind.CONV_TRANSPOSE):
        npb = 0 if shortcut else int(_conv_input_channels(pairs, int(node.attrs.get("groups", 1))).sum())
    else:
        npb = int(per_out.sum()) + (int(pairs.any(axis=0).sum()) if param.in_axis is not None else 0)
    return LayerPaths(
        param=param.name, nodes=tuple(n.name for n in users), kind=node.kind.value, effective=effective,
        effective_params=int(np.count_nonzero(effective)), effective_nodes=int(per_out.sum()), total_nodes=n_out,
        effective_kernels=int(pairs.sum()) if param.in_axis is not None else int(per_out.sum()), npb_nodes=npb, shortcut=shortcut,
    )


def output_channels(param: Param, node: Node) -> int:
    """The layer's output channels: the weight's out axis, times the groups for a transposed
    conv (its weight holds out/groups of them)."""
    groups = int(node.attrs.get("groups", 1)) if node.kind is OpKind.CONV_TRANSPOSE else 1
    return param.shape[param.out_axis] * groups


def _transposed_pairs(pairs: np.ndarray, groups: int) -> np.ndarray:
    """A transposed conv's (out/groups, in) pairs as a conv's (out, in/groups): real output channel
    ``g·out/groups + j`` reads input ``g·in/groups + i`` through stored ``(g·in/groups + i, j)``."""
    per_out, n_in = pairs.shape
    per_in = n_in // groups
    return pairs.reshape(per_out, groups, per_in).transpose(1, 0, 2).reshape(groups * per_out, per_in)


def _conv_input_channels(pairs: np.ndarray, groups: int) -> np.ndarray:
    """Which real input channels (across groups) carry ≥1 effective weight; ``pairs`` is (out, in/groups)."""
    n_out, in_per_group = pairs.shape
    return pairs.reshape(groups, n_out // groups, in_per_group).any(axis=1).reshape(-1)


def is_shortcut(node: Node, param: Param) -> bool:
    """A residual projection: named so, or a 1×1 conv feeding an add beside another conv path."""
    label = f"{param.name} {param.origin} {node.name} {node.origin}".lower()
    if "shortcut" in label or "downsample" in label:
        return True
    if node.kind is not OpKind.CONV or math.prod(node.attrs.get("kernel_shape", [0])) != 1:
        return False
    if not _reaches(node.outputs[0], lambda n: n.kind is OpKind.ADD, _THROUGH):
        return False
    x = node.inputs[0]
    through = (*_THROUGH, OpKind.POOL, OpKind.RESHAPE)
    return any(
        u is not node and (u.kind is OpKind.CONV or _reaches(u.outputs[0], lambda n: n.kind is OpKind.CONV, through))
        for u in x.uses if u.kind is OpKind.CONV or u.kind in through
    )


def _reaches(start: Any, goal: Any, through: tuple[OpKind, ...]) -> bool:
    stack, seen = [start], set()
    while stack:
        v = stack.pop()
        for u in v.uses:
            if goal(u):
                return True
            if u.kind in through and id(u) not in seen:
                seen.add(id(u))
                stack.extend(u.outputs)
    return False
