"""Array back-ends of the channel-level tape: numpy (CPU: ~1 us per small op) or torch (any device).

The tape's instructions are written once against this small interface; arithmetic, ``@``,
``.reshape`` and comparisons are shared by numpy arrays and torch tensors. ``normalise``
is DPaI's x / m with m = max(x) (m = 1 for an all-zero input, without a host sync on the
torch side) and ``normalise_backward`` its gradient including the log m term of log P. Inputs larger than
``KEEP_SCALED`` elements keep only x between forward and backward (x / m is recomputed, the
same operation, so the same values).
"""
from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

import numpy as np

__all__ = ["Ops", "NumpyOps", "TorchOps", "make_ops", "KEEP_SCALED"]

KEEP_SCALED = 4096


class Ops:
    """Interface (see the module docstring). ``memo``: torch views of tape values, per forward."""

    name = ""

    def __init__(self) -> None:
        self.memo: dict[int, Any] = {}

    def wrap(self, t: Any) -> Any: ...  # torch tensor -> back-end array sharing memory
    def to_torch(self, a: Any) -> Any: ...
    def zeros(self, shape: Sequence[int]) -> Any: ...
    def ones(self, shape: Sequence[int]) -> Any: ...
    def log(self, x: Any) -> Any: ...
    def sum_to(self, g: Any, axes: tuple[int, ...]) -> Any: ...
    def broadcast_to(self, x: Any, shape: Sequence[int]) -> Any: ...
    def cat(self, xs: Sequence[Any], axis: int) -> Any: ...
    def split(self, x: Any, sizes: Sequence[int], axis: int) -> list[Any]: ...
    def transpose(self, x: Any, perm: Sequence[int]) -> Any: ...
    def write(self, out: Any, value: Any, accumulate: bool) -> None: ...
    def fill_zero(self, out: Any) -> None: ...
    def outer_into(self, out: Any, a: Any, b: Any) -> None: ...  # out[o, i] = a[o] * b[i]
    def matmul_into(self, out: Any, a: Any, b: Any) -> None: ...  # out = a @ b
    def scalar(self, x: Any) -> Any: ...  # a 0-d torch tensor of the value
    def take(self, x: Any, index: Any, axis: int) -> Any: ...  # x's entries ``index`` (1-d) along ``axis``
    def take_backward(self, g: Any, index: Any, axis: int, shape: Sequence[int]) -> Any: ...  # zeros(shape), g added at ``index``, in index order
    def normalise(self, x: Any) -> tuple[Any, Any, Any]: ...  # (x / m, saved, log m)
    def normalise_backward(self, gxh: Any, saved: Any, xh: Any) -> Any: ...

    @staticmethod
    def rescaled(saved: Any) -> Any:
        """x / m again from ``saved`` (kept only for small x: a large one is recomputed, not stored)."""
        return saved[1] if saved[1] is not None else saved[0] / saved[2]


class NumpyOps(Ops):
    name = "numpy"

    def wrap(self, t: Any) -> Any:
        return t.detach().numpy()

    def to_torch(self, a: Any) -> Any:
        import torch

        return torch.from_numpy(np.require(a, np.float32, ["C", "W"]))

    def zeros(self, shape: Sequence[int]) -> Any:
        return np.zeros(tuple(shape), dtype=np.float32)

    def ones(self, shape: Sequence[int]) -> Any:
        return np.ones(tuple(shape), dtype=np.float32)

    def normalise(self, x: Any) -> tuple[Any, Any, Any]:
        raw = float(np.maximum.reduce(x, axis=None)) if x.size else 0.0  # x.max() without its Python wrapper
        m = raw if raw > 0 else 1.0
        xh = x / m
        return xh, (x, xh if x.size <= KEEP_SCALED else None, m, raw), math.log(m)

    def normalise_backward(self, gxh: Any, saved: Any, xh: Any) -> Any:
        x, _, m, raw = saved
        gx = gxh / m
        if raw > 0:  # d/dx of (x / max x) and of log max x: the max's share splits evenly over ties
            dm = (1.0 - float(np.vdot(gxh, xh))) / m
            hit = x == raw
            np.add(gx, dm / np.count_nonzero(hit), out=gx, where=hit)
        return gx

    def log(self, x: Any) -> Any:
        return np.log(x)

    def sum_to(self, g: Any, axes: tuple[int, ...]) -> Any:
        return g.sum(axis=axes, keepdims=True) if axes else g

    def broadcast_to(self, x: Any, shape: Sequence[int]) -> Any:
        return np.broadcast_to(x, tuple(shape))

    def cat(self, xs: Sequence[Any], axis: int) -> Any:
        return np.concatenate(list(xs), axis=axis)

    def split(self, x: Any, sizes: Sequence[int], axis: int) -> list[Any]:
        return np.split(x, np.cumsum(sizes)[:-1], axis=axis)

    def transpose(self, x: Any, perm: Sequence[int]) -> Any:
        return x.transpose(tuple(perm))

    def write(self, out: Any, value: Any, accumulate: bool) -> None:
        if accumulate:
            out += value
        else:
            out[...] = value

    def fill_zero(self, out: Any) -> None:
        out.fill(0)

    def outer_into(self, out: Any, a: Any, b: Any) -> None:
        np.multiply(a[:, None], b[None, :], out=out)

    def matmul_into(self, out: Any, a: Any, b: Any) -> None:
        np.matmul(a, b, out=out)

    def scalar(self, x: Any) -> Any:
        import torch

        return torch.tensor(float(x))

    def take(self, x: Any, index: Any, axis: int) -> Any:
        return np.take(x, index, axis=axis)

    def take_backward(self, g: Any, index: Any, axis: int, shape: Sequence[int]) -> Any:
        out = np.zeros(tuple(shape), dtype=np.float32)
        moved, gm = np.moveaxis(out, axis, 0), np.moveaxis(g, axis, 0)
        if index.size == 1:  # a basic slice (0 + g, as index_add adds)
            moved[int(index[0])] += gm[0]
        elif np.unique(index).size == index.size:
            moved[index] += gm
        else:  # index_add's order: duplicates add in turn (np.add.at is ~50x slower than the slices above)
            np.add.at(moved, index, gm)
        return out


class TorchOps(Ops):
    name = "torch"

    def __init__(self, device: Any) -> None:
        super().__init__()
        self.device = device

    def wrap(self, t: Any) -> Any:
        return t.detach()

    def to_torch(self, a: Any) -> Any:
        return a

    def zeros(self, shape: Sequence[int]) -> Any:
        import torch

        return torch.zeros(tuple(shape), dtype=torch.float32, device=self.device)

    def ones(self, shape: Sequence[int]) -> Any:
        import torch

        return torch.ones(tuple(shape), dtype=torch.float32, device=self.device)

    def normalise(self, x: Any) -> tuple[Any, Any, Any]:
        import torch

        raw = x.amax()
        valid = raw > 0
        m = torch.where(valid, raw, torch.ones_like(raw))
        xh = x / m
        return xh, (x, xh if x.numel() <= KEEP_SCALED else None, m, raw, valid), m.log()

    def normalise_backward(self, gxh: Any, saved: Any, xh: Any) -> Any:
        x, _, m, raw, valid = saved
        hit = (x == raw).to(x.dtype)
        dm = valid * (1.0 - (gxh * xh).sum()) / (m * hit.sum())
        return gxh / m + hit * dm

    def log(self, x: Any) -> Any:
        return x.log()

    def sum_to(self, g: Any, axes: tuple[int, ...]) -> Any:
        return g.sum(dim=axes, keepdim=True) if axes else g

    def broadcast_to(self, x: Any, shape: Sequence[int]) -> Any:
        return x.broadcast_to(tuple(shape))

    def cat(self, xs: Sequence[Any], axis: int) -> Any:
        import torch

        return torch.cat(list(xs), dim=axis)

    def split(self, x: Any, sizes: Sequence[int], axis: int) -> list[Any]:
        import torch

        return list(torch.split(x, list(sizes), dim=axis))

    def transpose(self, x: Any, perm: Sequence[int]) -> Any:
        return x.permute(tuple(perm))

    def write(self, out: Any, value: Any, accumulate: bool) -> None:
        if accumulate:
            out += value
        else:
            out.copy_(value)

    def fill_zero(self, out: Any) -> None:
        out.zero_()

    def outer_into(self, out: Any, a: Any, b: Any) -> None:
        import torch

        torch.mul(a[:, None], b[None, :], out=out)

    def matmul_into(self, out: Any, a: Any, b: Any) -> None:
        import torch

        torch.matmul(a, b, out=out)

    def scalar(self, x: Any) -> Any:
        return x.detach() if hasattr(x, "detach") else x

    def take(self, x: Any, index: Any, axis: int) -> Any:
        return x.index_select(axis, index)

    def take_backward(self, g: Any, index: Any, axis: int, shape: Sequence[int]) -> Any:
        return self.zeros(shape).index_add_(axis, index, g)


def make_ops(device: Any) -> Ops:
    """numpy on the CPU (tiny ops dominate), torch elsewhere."""
    import torch

    return NumpyOps() if torch.device(device).type == "cpu" else TorchOps(device)
