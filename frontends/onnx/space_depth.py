"""ONNX DepthToSpace / SpaceToDepth (PixelShuffle / PixelUnshuffle) as reshape -> transpose -> reshape.

With block size b on x (N, C, H, W):

    DepthToSpace DCR: (N, b, b, C/b², H, W) -> perm (0, 3, 4, 1, 5, 2) -> (N, C/b², H·b, W·b)
    DepthToSpace CRD: (N, C/b², b, b, H, W) -> perm (0, 1, 4, 2, 5, 3) -> (N, C/b², H·b, W·b)
    SpaceToDepth:     (N, C, H/b, b, W/b, b) -> perm (0, 3, 5, 1, 2, 4) -> (N, C·b², H/b, W/b)

(the ONNX definitions). The three steps are plain IR data movement, so paths move as values do
and every analysis, criterion and backend sees nothing new.
"""
from __future__ import annotations

from typing import Any

from pai_compiler.errors import ModelError
from pai_compiler.ir import Dim, OpKind, Value

__all__ = ["SPACE_DEPTH_HANDLERS"]


def _plan(op: str, mode: str, shape: tuple[Dim, ...], b: int) -> tuple[tuple[Dim, ...], list[int], tuple[Dim, ...]] | str:
    """(split shape, permutation, output shape), or why the node cannot be lowered."""
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        return "needs a 4-D input with static channels and spatial sizes"
    n, c, h, w = shape
    if op == "SpaceToDepth":
        if h % b or w % b:
            return f"spatial sizes {h}x{w} are not multiples of the block size {b}"
        return (n, c, h // b, b, w // b, b), [0, 3, 5, 1, 2, 4], (n, c * b * b, h // b, w // b)
    if c % (b * b):
        return f"{c} channels are not a multiple of blocksize² = {b * b}"
    out = (n, c // (b * b), h * b, w * b)
    if mode == "CRD":
        return (n, c // (b * b), b, b, h, w), [0, 1, 4, 2, 5, 3], out
    return (n, b, b, c // (b * b), h, w), [0, 3, 4, 1, 5, 2], out


def _space_depth(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    x = ins[0]
    mode = attrs.get("mode", "DCR")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    b = int(attrs.get("blocksize", 0))
    if not isinstance(x, Value) or x.shape is None or b < 1 or mode not in ("DCR", "CRD"):
        raise ModelError(f"node {label!r} ({node.op_type}): needs an activation of known rank, blocksize >= 1 and mode DCR or CRD; "
                         "re-export the model with static input shapes")
    plan = _plan(node.op_type, mode, tuple(x.shape), b)
    if isinstance(plan, str):
        raise ModelError(f"node {label!r} ({node.op_type}): {plan}; re-export the model with static input shapes")
    split, perm, out = plan
    g = imp.graph
    steps = [("reshape", split, {"op": "reshape", "shape": list(split)}),
             ("transpose", tuple(split[p] for p in perm), {"op": "transpose", "perm": perm}),
             ("reshape", out, {"op": "reshape", "shape": list(out)})]
    value = x
    for i, (what, shape, step_attrs) in enumerate(steps):
        name = node.output[0] if i == len(steps) - 1 else g.fresh_name(f"{x.name}_{what}{i}")
        ir = g.add_node(OpKind.RESHAPE, g.fresh_name(f"{label}_{what}"), [value], [(name, shape, x.dtype)], attrs=step_attrs, origin=node.name)
        value = ir.outputs[0]
    imp.env[node.output[0]] = value


SPACE_DEPTH_HANDLERS = {"DepthToSpace": _space_depth, "SpaceToDepth": _space_depth}
