"""Kernel-level DPaI state for channel R_P: |S_e| = max(|S0_e| + O_k, O_k - min_s O_k(s)) (live taps).

In channel mode every live tap e of kernel k gets the same gradient up to sign:
S.grad_e = sign(S_e) * G_k with G_k = c_k * dlogP/dW[k] (``step.py``). Adam is odd in the
gradient history, so while no score changes sign its moments are m_e = sign(S_e) M_k and
v_e = V_k, the same float operations give the same step s_k for every tap, and

    |S_e(t+1)| = |S_e(t)| - s_k   <=>   |S_e(t)| = |S0_e| + O_k(t),  O_k(t+1) = O_k(t) - s_k

with O the parameter of one Adam over the n_kernels entries (gradient G). Dead taps (live 0) get
no gradient and keep |S0|. The per-weight state shrinks from S, S.grad and two moments (16 B)
to |S0| (4 B), and a step touches kernels, not weights.

A score reaches 0 when its kernel's |S| shrinks (dlogP/dW < 0 happens: DPaI's per-layer
normalisation weights skip paths differently from the conv paths) by more than |S0_e|. Per
weight, S then flips sign, which flips its gradient: it is held at 0 (within a few lr) while
the kernel keeps shrinking and grows again as soon as the kernel grows. That is the floor
term: with F_k(t) = min(0, min_s O_k(s)), |S_e| = max(|S0_e| + O_k, O_k - F_k) (equal to the
first while |S0_e| + F_k >= 0). Such entries sit far below every keep boundary;
:meth:`KernelScores.crossed` counts them for the report. Floats: |S0| + O rounds the sum of
the moves once instead of |S| every step (differences of an ulp), so this is the per-weight run
to float rounding, not bit for bit (``state=weights`` keeps that one).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pai_compiler.passes.criteria.dpai.layout import LayerInfo, Layout

if TYPE_CHECKING:
    import torch

__all__ = ["KernelScores", "AbsScores", "ScoreSource"]


class ScoreSource:
    """What the incremental top-k reads: |S| of a layer, |S| at pooled indices, and drift."""

    def layer(self, offset: int, numel: int) -> torch.Tensor:
        """|S| of the flat range [offset, offset + numel) (one layer)."""
        raise NotImplementedError

    def prepare(self, idx: torch.Tensor) -> Any:
        """Per-pool constants for :meth:`at` (computed when a pool is rebuilt)."""
        raise NotImplementedError

    def at(self, idx: torch.Tensor, aux: Any) -> torch.Tensor:
        """|S| at flat indices ``idx`` (a fresh tensor), ``aux`` from :meth:`prepare`."""
        raise NotImplementedError

    def layer_host(self, offset: int, numel: int) -> np.ndarray:
        """:meth:`layer` as a numpy array (CPU tensors)."""
        return self.layer(offset, numel).numpy()

    def prepare_host(self, idx: np.ndarray) -> Any:
        """:meth:`prepare` for :meth:`at_host` (``idx`` a numpy array)."""
        import torch

        return self.prepare(torch.from_numpy(idx))

    def at_host(self, idx: np.ndarray, aux: Any) -> np.ndarray:
        """:meth:`at` on CPU tensors, as a writable numpy array (``idx`` a numpy array)."""
        import torch

        return self.at(torch.from_numpy(idx), aux).numpy()

    def snapshot(self) -> Any:
        raise NotImplementedError

    def drift_host(self, snapshot: Any) -> float:
        """:meth:`drift_tensor` on CPU tensors, as a host number."""
        return float(self.drift_tensor(snapshot))

    def drift(self, snapshot: Any) -> float:
        """max |change of any |S|| since ``snapshot`` (one host sync)."""
        return float(self.drift_tensor(snapshot))

    def drift_tensor(self, snapshot: Any) -> torch.Tensor:
        """The same bound as a 0-d tensor on the device (no host sync)."""
        raise NotImplementedError

    def stepped(self) -> None:
        """Called after every optimiser step."""


class AbsScores(ScoreSource):
    """A plain flat score tensor (per-pixel modes, band state)."""

    def __init__(self, scores: torch.Tensor) -> None:
        self.scores = scores.detach()

    def layer(self, offset: int, numel: int) -> torch.Tensor:
        return self.scores[offset : offset + numel].abs()

    def prepare(self, idx: torch.Tensor) -> Any:
        return None

    def at(self, idx: torch.Tensor, aux: Any) -> torch.Tensor:
        return self.scores.index_select(0, idx.reshape(-1)).abs_().view(idx.shape)

    def snapshot(self) -> Any:
        return self.scores.clone()

    def drift_tensor(self, snapshot: Any) -> torch.Tensor:
        return (self.scores - snapshot).abs_().amax() if self.scores.numel() else self.scores.new_zeros(())


class KernelScores(ScoreSource):
    """|S0| per weight and the kernel offsets O (the Adam leaf, ``offset``); see the module docstring."""

    def __init__(self, layout: Layout, scores0: torch.Tensor, device: str | torch.device) -> None:
        import torch

        self.layout, self.device = layout, device
        self.base = scores0.detach().abs().to(device)
        self.offset = torch.zeros(layout.n_kernels, dtype=torch.float32, device=device, requires_grad=True)
        self.floor = torch.zeros(layout.n_kernels, dtype=torch.float32, device=device)  # F = min(0, min_s O(s))
        self.lift = torch.zeros(layout.n_kernels, dtype=torch.float32, device=device)  # O - F >= 0
        self._diff: torch.Tensor | None = None  # drift's buffer
        on_cpu = torch.device(device).type == "cpu"
        self._host = (self.offset.detach().numpy(), self.floor.numpy(), self.lift.numpy()) if on_cpu else None
        self._by_offset = {layer.offset: layer for layer in layout.layers}
        self._live_rows = {
            layer.index: torch.as_tensor(layout.tap_live[layer.name], dtype=torch.float32, device=device).view(1, -1)
            for layer in layout.layers if layer.name in layout.tap_live
        }
        starts = [layer.offset for layer in layout.layers]
        self._starts = torch.as_tensor(np.asarray(starts, dtype=np.int64), device=device)
        self._kernel_start = torch.as_tensor(np.asarray([layer.kernel_offset for layer in layout.layers], dtype=np.int64), device=device)
        self._taps = torch.as_tensor(np.asarray([layer.taps for layer in layout.layers], dtype=np.int64), device=device)
        self._live_table: torch.Tensor | None = None
        if self._live_rows:
            table = [layout.tap_live.get(layer.name, np.ones(layer.taps, bool)).astype(np.float32) for layer in layout.layers]
            self._live_table = torch.as_tensor(np.concatenate(table), device=device)
            self._live_start = torch.as_tensor(np.cumsum([0] + [layer.taps for layer in layout.layers[:-1]]), dtype=torch.int64, device=device)

    def stepped(self) -> None:
        import torch

        if self._host is not None:  # the CPU: the same float32 operations in numpy (a fraction of torch's call cost)
            offset, floor, lift = self._host
            np.minimum(floor, offset, out=floor)
            np.subtract(offset, floor, out=lift)
            return
        offset = self.offset.detach()
        torch.minimum(self.floor, offset, out=self.floor)
        torch.sub(offset, self.floor, out=self.lift)

    def _kernel_terms(self, layer: LayerInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """(live * O, live * (O - F)) per entry of ``layer``, as [kernels, 1 or taps] broadcasts."""
        a, b = layer.kernel_offset, layer.kernel_offset + layer.kernels
        o, lift = self.offset.detach()[a:b].unsqueeze(1), self.lift[a:b].unsqueeze(1)
        live = self._live_rows.get(layer.index)
        return (o, lift) if live is None else (o * live, lift * live)

    def layer(self, offset: int, numel: int) -> torch.Tensor:
        import torch

        layer = self._by_offset[offset]
        o, lift = self._kernel_terms(layer)
        return torch.maximum(self.base[offset : offset + numel].view(layer.kernels, layer.taps) + o, lift).reshape(-1)

    def layer_host(self, offset: int, numel: int) -> np.ndarray:
        """:meth:`layer` in numpy (CPU): the same float32 operations."""
        layer = self._by_offset[offset]
        a, b = layer.kernel_offset, layer.kernel_offset + layer.kernels
        o, lift = self.offset.detach().numpy()[a:b, None], self.lift.numpy()[a:b, None]
        live = self._live_rows.get(layer.index)
        if live is not None:
            o, lift = o * live.numpy(), lift * live.numpy()
        return np.maximum(self.base.numpy()[offset : offset + numel].reshape(layer.kernels, layer.taps) + o, lift).reshape(-1)

    def prepare(self, idx: torch.Tensor) -> Any:
        """(|S0|, kernel, liveness or None) per pooled entry."""
        import torch

        which = torch.searchsorted(self._starts, idx, right=True) - 1
        local = idx - self._starts[which]
        taps = self._taps[which]
        kernel = self._kernel_start[which] + torch.div(local, taps, rounding_mode="floor")
        live = None
        if self._live_table is not None:
            live = self._live_table[self._live_start[which] + local % taps].reshape(-1)
        return self.base[idx].reshape(-1), kernel.reshape(-1), live

    def at(self, idx: torch.Tensor, aux: Any) -> torch.Tensor:
        import torch

        base, kernel, live = aux  # kernel: flat (index_select is 3x faster than 2-d indexing)
        moved, lift = self.offset.detach().index_select(0, kernel), self.lift.index_select(0, kernel)
        if live is not None:
            moved, lift = moved.mul_(live), lift.mul_(live)
        return torch.maximum(moved.add_(base), lift).view(idx.shape)

    def prepare_host(self, idx: np.ndarray) -> Any:
        """:meth:`prepare` as numpy arrays (CPU), for :meth:`at_host`."""
        import torch

        return tuple(None if t is None else t.numpy() for t in self.prepare(torch.from_numpy(idx)))

    def at_host(self, idx: np.ndarray, aux: Any) -> np.ndarray:
        """:meth:`at` in numpy (CPU): the same float32 operations in the same order (``aux`` from
        :meth:`prepare` or :meth:`prepare_host`)."""
        base, kernel, live = (t if t is None or isinstance(t, np.ndarray) else t.numpy() for t in aux)
        offset, lift = (self.offset.detach().numpy(), self.lift.numpy()) if self._host is None else (self._host[0], self._host[2])
        moved, lift = offset.take(kernel), lift.take(kernel)
        if live is not None:
            moved *= live
            lift *= live
        moved += base
        return np.maximum(moved, lift, out=moved).reshape(idx.shape)

    def snapshot(self) -> Any:
        return self.offset.detach().clone(), self.lift.clone()

    def drift_host(self, snapshot: Any) -> float:
        """:meth:`drift_tensor` in numpy (CPU), the same float32 value."""
        if not self.offset.numel():
            return 0.0
        if self._diff is None:
            import torch

            self._diff = torch.empty_like(self.lift)
        diff, bound = self._diff.numpy(), 0.0
        offset, lift = (self.offset.detach().numpy(), self.lift.numpy()) if self._host is None else (self._host[0], self._host[2])
        for now, then in ((offset, snapshot[0]), (lift, snapshot[1])):
            np.subtract(now, then.numpy(), out=diff)
            bound = max(bound, float(diff.max()), -float(diff.min()))
        return bound

    def drift_tensor(self, snapshot: Any) -> torch.Tensor:
        """|S_e| is 1-Lipschitz in O_k and in O_k - F_k: the larger of their largest changes."""
        import torch

        if not self.offset.numel():
            return self.lift.new_zeros(())
        offset, lift = snapshot
        if self._diff is None:
            self._diff = torch.empty_like(self.lift)
        bounds = []
        for now, then in ((self.offset.detach(), offset), (self.lift, lift)):  # sub + aminmax: 4x vector_norm's speed
            low, high = torch.aminmax(torch.sub(now, then, out=self._diff))
            bounds.append(torch.maximum(high, -low))
        return torch.maximum(*bounds)

    def checkpoint(self) -> tuple[torch.Tensor, ...]:
        """Copies of the kernel state (O, F, O - F), for :meth:`restore`."""
        return self.offset.detach().clone(), self.floor.clone(), self.lift.clone()

    def restore(self, saved: tuple[torch.Tensor, ...]) -> None:
        for mine, copy in zip((self.offset.detach(), self.floor, self.lift), saved):
            mine.copy_(copy)

    def crossed(self) -> int:
        """Live entries whose score reached 0 at some step (held at the floor; see the module docstring)."""
        count = 0
        for layer in self.layout.layers:
            a, b = layer.kernel_offset, layer.kernel_offset + layer.kernels
            base = self.base[layer.offset : layer.offset + layer.numel].view(layer.kernels, layer.taps)
            live = self._live_rows.get(layer.index)
            below = (base + self.floor[a:b].unsqueeze(1)) < 0
            count += int((below if live is None else below & (live > 0)).sum())
        return count
