"""NPB (NeurIPS 2023): node-path balance, one integer program per layer (see ``criterion.py``).

Modules by role: ``criterion`` (the pass), ``linear`` and ``milp`` (the per-layer programs),
``finetune`` (the path-count fine-tuning of the chosen masks).
"""
from __future__ import annotations

from pai_compiler.passes.criteria.npb.criterion import NpbPass, NpbReport

__all__ = ["NpbPass", "NpbReport"]
