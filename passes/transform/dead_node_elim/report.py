"""The compact report: what dead-node elimination did to a graph (channels per layer, folds, changed Params).

One ``CompactReport`` per applied round; ``earlier.then(later)`` merges two in run order (a
layer's "before" counts stay the earliest, lists are concatenated, the kept-dead reasons are
the latest round's), and ``compact_report_of(records)`` merges every dead-node-elim run of a
PassManager run. The compact ONNX writer needs the merged report of everything done to a graph
since it was read (which Params, Reshapes and Splits to rewrite).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from pai_compiler.pass_infra import PassRecord

__all__ = ["LayerChange", "FoldRecord", "CompactReport", "compact_report_of"]


@dataclass(frozen=True)
class LayerChange:
    """One conv/linear weight's shape before and after; (before, after) channel counts per axis."""

    param: str
    node: str
    op: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    channels_out: tuple[int, int] | None
    channels_in: tuple[int, int] | None

    def since(self, earlier: LayerChange) -> LayerChange:
        """This change counted from ``earlier``'s "before" (two rounds as one)."""
        def first(now: tuple[int, int] | None, then: tuple[int, int] | None) -> tuple[int, int] | None:
            return (then[0], now[1]) if now is not None and then is not None else now

        return replace(self, shape_before=earlier.shape_before, channels_out=first(self.channels_out, earlier.channels_out),
                       channels_in=first(self.channels_in, earlier.channels_in))

    def as_dict(self) -> dict[str, Any]:
        """The row of the CLI's JSON report (stable keys)."""
        row: dict[str, Any] = {"name": self.param, "node": self.node, "op": self.op,
                               "shape_before": list(self.shape_before), "shape_after": list(self.shape_after)}
        if self.channels_out is not None:
            row["out"] = list(self.channels_out)
        if self.channels_in is not None:
            row["in"] = list(self.channels_in)
        return row


@dataclass(frozen=True)
class FoldRecord:
    """Constant input channels of ``node`` folded ``into`` a bias, BN mean, add constant or bias map."""

    node: str
    constant_channels: int
    into: str

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "constant_channels": self.constant_channels, "into": self.into}


@dataclass(frozen=True)
class CompactReport:
    """What dead-node elimination changed; ``rounds == 0``: nothing (the graph is unchanged)."""

    layers: tuple[LayerChange, ...] = ()
    folds: tuple[FoldRecord, ...] = ()
    reshapes: tuple[str, ...] = ()  # Reshape nodes whose target shape was rewritten
    splits: tuple[str, ...] = ()  # Split nodes whose sizes were rewritten
    weights_dropped: int = 0  # kept weights masked (dead rows, folded constant columns)
    changed_params: tuple[str, ...] = ()  # sorted names of every Param whose data changed
    kept_dead_channels: tuple[tuple[str, int], ...] = ()  # (reason, dead channels kept for it)
    kept_dead_sources: tuple[tuple[str, int], ...] = ()  # the same, per reason naming its node ("add 'x': graph output")
    removed_atoms: int = 0
    rounds: int = 0

    @property
    def applied(self) -> bool:
        """Did dead-node elimination change the graph (layers may have changed shape)?"""
        return self.rounds > 0

    def with_kept_dead(self, kept_dead_channels: tuple[tuple[str, int], ...], kept_dead_sources: tuple[tuple[str, int], ...]) -> CompactReport:
        """This report with the kept-dead channels of a later planning (one that removed nothing)."""
        return replace(self, kept_dead_channels=kept_dead_channels, kept_dead_sources=kept_dead_sources)

    def then(self, later: CompactReport) -> CompactReport:
        """This report followed by ``later`` on the same graph, as one report."""
        if not later.applied:
            return self.with_kept_dead(later.kept_dead_channels, later.kept_dead_sources) if later.kept_dead_channels else self
        if not self.applied:
            return later
        first = {layer.param: layer for layer in self.layers}
        layers = tuple(layer.since(first[layer.param]) if layer.param in first else layer for layer in later.layers)
        return CompactReport(
            layers=layers, folds=self.folds + later.folds, reshapes=self.reshapes + later.reshapes,
            splits=self.splits + later.splits, weights_dropped=self.weights_dropped + later.weights_dropped,
            changed_params=tuple(sorted({*self.changed_params, *later.changed_params})),
            kept_dead_channels=later.kept_dead_channels, kept_dead_sources=later.kept_dead_sources, removed_atoms=self.removed_atoms + later.removed_atoms,
            rounds=self.rounds + later.rounds,
        )


def compact_report_of(records: Iterable[PassRecord]) -> CompactReport:
    """Every CompactReport of a PassManager run (inside Sequential/Fixpoint steps too), merged in run order."""
    merged = CompactReport()
    for record in records:
        for leaf in record.leaves():
            if isinstance(leaf.report, CompactReport):
                merged = merged.then(leaf.report)
    return merged
