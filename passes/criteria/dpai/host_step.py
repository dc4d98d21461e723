"""The kernel-state channel step on the CPU in numpy: G = c * dlogP/dW per kernel, c = (a(1-b) node[o] - 1) + a b kernel[o,i].

:class:`HostKernelStep` is :class:`~pai_compiler.passes.criteria.dpai.loop.KernelStep` for small
CPU layouts (a kernel -> node map, ``step.NODE_MAP_MAX``): the same float32 operations in the
same order, on numpy views of the same buffers (the counts, dlogP/dW, S.grad), because a torch
call costs several times a numpy call on vectors of a few thousand entries. Its ``kept`` is
:meth:`SurrogateUpdate.kept` in numpy. Every number equals the torch path's bit for bit (sums
of 0/1 counts are exact; every product and sum is one float32 operation of the same operands),
so the masks are the same. Devices other than the CPU keep the torch step (sync-free there).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from pai_compiler.passes.criteria.dpai.channel_program import ChannelProgram
from pai_compiler.passes.criteria.dpai.loop import Measure
from pai_compiler.passes.criteria.dpai.step import Kept, SurrogateUpdate

if TYPE_CHECKING:
    import torch

__all__ = ["HostKernelStep", "host_step_applies"]


def host_step_applies(program: ChannelProgram, update: SurrogateUpdate) -> bool:
    """The numpy step runs where the tape does (the CPU) and the kernel -> node map exists."""
    return program.ops.name == "numpy" and program.counts is not None and update.node_of_kernel is not None


class HostKernelStep:
    """``KernelStep`` in numpy (see the module docstring); call it as the loop's ``step_fn``."""

    def __init__(self, program: ChannelProgram, update: SurrogateUpdate) -> None:
        assert host_step_applies(program, update) and program.counts is not None and program.grad is not None and update.node_of_kernel is not None
        self.program, self.update = program, update
        self.counts, self.wgrad = program.counts.numpy(), program.grad.numpy()
        self.node_of_kernel = update.node_of_kernel.numpy()
        # node n's value on its kernels as a repeat (a third of a gather's cost) where the map is node after node
        reps = np.bincount(self.node_of_kernel, minlength=update.layout.n_nodes)
        ordered = np.array_equal(np.repeat(np.arange(reps.size), reps), self.node_of_kernel)
        self.kernels_per_node = reps if ordered else None
        meta = {k: v.numpy() for k, v in update.meta.items()}
        self.offset, self.kernel_offset, self.taps = meta["offset"], meta["kernel_offset"], meta["taps"]
        self.node_offset, self.in_taps = meta["node_offset"], meta["in_taps"]
        self.live_table = None if update.live_table is None else update.live_table.numpy()
        self.live_start = None if update.live_table is None else update.live_start.numpy()
        self.node_scale, self.kernel_bonus = update.alpha * (1 - update.beta), update.alpha * update.beta
        self.n_nodes = update.layout.n_nodes
        self._grad_out: tuple[torch.Tensor, np.ndarray] | None = None  # S.grad and its numpy view

    def kept(self, keep_idx: torch.Tensor) -> Kept:
        """:meth:`SurrogateUpdate.kept` in numpy (the same integers), as CPU tensors."""
        import torch

        local = keep_idx.numpy() - self.offset
        kernel = self.kernel_offset + local // self.taps
        node = self.node_offset + local // self.in_taps
        live = None
        if self.live_table is not None and self.live_start is not None:
            live = torch.from_numpy(self.live_table[self.live_start + local % self.taps])
        return Kept(keep_idx, torch.from_numpy(kernel), torch.from_numpy(node), live)

    def _counts(self, kernel: np.ndarray, live: np.ndarray | None) -> None:
        """Kept live taps per kernel into the counts (one pass over the kernels: the layouts here are small)."""
        counts = self.counts
        np.copyto(counts, np.bincount(kernel, weights=live, minlength=counts.size))  # exact: sums of 0/1

    def __call__(self, scores: torch.Tensor, kept: Kept, grad_out: torch.Tensor | None) -> Measure:
        import torch

        kernel, live = kept.kernel.numpy(), None if kept.live is None else kept.live.numpy()
        self._counts(kernel, live)
        log_p = self.program.forward_backward()
        wgrad, counts = self.wgrad, self.counts
        moving = wgrad[kernel] != 0
        effective = moving if live is None else moving & (live > 0)
        nodes = np.zeros(self.n_nodes, dtype=np.float32)
        nodes[kept.node.numpy()[effective]] = 1.0
        if grad_out is not None:
            kernel_flag = (moving & (counts[kernel] > 0)).astype(np.float32)
            per_node = nodes * np.float32(self.node_scale) - np.float32(1.0)
            c = per_node.take(self.node_of_kernel) if self.kernels_per_node is None else np.repeat(per_node, self.kernels_per_node)
            c[kernel] = c[kernel] + kernel_flag * np.float32(self.kernel_bonus)
            np.multiply(c, wgrad, out=self._view(grad_out))
        return Measure(log_p, torch.from_numpy(effective), torch.from_numpy(nodes), self._kernel_count())

    def _view(self, grad_out: torch.Tensor) -> np.ndarray:
        if self._grad_out is None or self._grad_out[0] is not grad_out:
            self._grad_out = (grad_out, grad_out.numpy())
        return self._grad_out[1]

    def _kernel_count(self) -> Callable[[], torch.Tensor]:
        """Kernels with kept live taps and a nonzero gradient, evaluated on read (``ChannelStep``'s
        count: the kernels of the effective kept entries)."""
        import torch

        counts, wgrad = self.counts, self.wgrad
        return lambda: torch.tensor(np.count_nonzero((counts > 0) & (wgrad != 0)))
