"""What a dpai run reports: budget, timings, the measured initial/final masks and the optimisation trace.

``initial``/``final`` hold the per-pixel reference-convention log paths, nodes, kernels and
effective params of the masks before and after the optimisation (``final`` also its
``node_path`` analysis); ``objective`` the optimised R_P at both ends, in the chosen convention.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["DpaiReport"]


@dataclass(frozen=True)
class DpaiReport:
    """The ``PassResult.report`` of ``dpai`` (kept in its PassRecord)."""

    paths: str
    steps: int
    seconds: float
    ms_per_step: float
    setup_seconds: float
    device: str
    threads: int
    seed: int
    alpha: float
    beta: float
    lr: float
    kept: int
    state: str
    tracked: int
    convention: str
    initial: dict[str, Any]
    final: dict[str, Any]
    objective: dict[str, Any]
    trajectory: list[dict[str, Any]]
    topk: dict[str, Any]
    dead_taps: list[str]
    patterns: dict[str, str] = dataclasses.field(default_factory=dict)  # N:M layers, binarised per group

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data (a deep copy)."""
        return dataclasses.asdict(self)
