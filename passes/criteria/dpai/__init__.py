"""DPaI (ICLR 2025): per-weight scores, per-layer top-k at ERK densities, optimised by the
gradients of effective paths R_P, nodes R_N and kernels R_C (see ``criterion.py`` for the formula).

Modules by role: ``criterion`` (the pass and its options), ``driver`` (one run: state, loop,
report), ``layout`` (flat score layout), ``select`` (top-k with ties), ``fixed_pool`` (its
sync-free form), ``kernel_state`` (channel mode's |S0| + kernel offsets), ``step`` (the Adam update),
``loop`` (the steps), ``band``/``band_step`` (the boundary-band state), ``channel_program``,
``tape``, ``ops``, ``torch_ops`` (the channel-mode path program and its gradient), ``token_rows``
(a linear layer's identical token rows counted once),
``pixel_paths`` (per-pixel reference and exact path counts), ``geometry``, ``report`` (measuring
a mask), ``outcome`` (``DpaiReport``, what a run reports).
"""
from __future__ import annotations

from pai_compiler.passes.criteria.dpai.criterion import DpaiPass, PathMode, StateMode, TieMode
from pai_compiler.passes.criteria.dpai.outcome import DpaiReport

__all__ = ["DpaiPass", "DpaiReport", "PathMode", "TieMode", "StateMode"]
