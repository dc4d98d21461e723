"""Removal planning: which dead channel atoms go, which constants fold where, which kept weights are masked.

A channel atom is dead when no value carrying it is F ∧ B (``liveness``). Constraints keep
dead atoms, to a fixpoint (each only keeps more, and keeping a channel is always exact):
pinned atoms (coupling: LayerNorm/GroupNorm statistics, outputs, attention chains, shared
Params); a grouped conv's group goes whole; every tracked value keeps ≥ 1 channel; with
``align=N`` conv/linear inputs and outputs keep a multiple of N channels where they can; a
removed constant channel needs a fold (``fold``), and a shared weight's constant inputs stay.
Every round that changes something keeps at least one more atom, so the fixpoint comes within
(number of atoms + 1) rounds; not reaching it is a FixpointError, never a silent stop.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pai_compiler.ir import Graph, Node
from pai_compiler.pass_infra import iterate_to_fixpoint
from pai_compiler.passes.analysis.coupling import ChannelSpaces
from pai_compiler.passes.transform.dead_node_elim.fold import Fold, ZeroInputValues, fold_for
from pai_compiler.passes.transform.dead_node_elim.liveness import WEIGHTED, channel_liveness, connectivity, reads_track

__all__ = ["RemovalPlan", "plan_removal", "shared_weights"]


@dataclass
class RemovalPlan:
    """Which atoms go, the index masks per value, and the folds per consumer."""

    removed: set[int]
    keep: dict[str, np.ndarray]  # value name -> bool per tracked index (only values that shrink)
    folds: dict[str, Fold]
    kept_dead: dict[str, int]  # reason -> dead atoms kept for it
    dead_rows: dict[str, np.ndarray]  # weighted node -> kept output indices that reach nothing
    kept_dead_sources: dict[str, int] = field(default_factory=dict)  # reason with its node -> dead atoms

    @property
    def empty(self) -> bool:
        return not self.keep and not self.dead_rows and not any(f.mask_in is not None and len(f.mask_in) for f in self.folds.values())


def shared_weights(graph: Graph) -> set[str]:
    """Conv/linear nodes whose weight Param another node uses too (tied or reused weights).

    Such a weight is a boundary: coupling pins the channels it indexes (never sliced), and it
    is never tightened nor folded into, since masking it for one user would change what every
    other user computes (possibly in another layout)."""
    users: dict[object, int] = {}
    for node in graph.nodes:
        for k in {p.storage for p in node.params.values()}:
            users[k] = users.get(k, 0) + 1
    return {n.name for n in graph.nodes if n.kind in WEIGHTED and users[n.params["weight"].storage] > 1}


def plan_removal(graph: Graph, cs: ChannelSpaces, *, fold: bool = True, align: int = 1) -> RemovalPlan:
    """Decide which channel atoms go, which constants are folded where, and which kept weights
    are masked (``dead_rows``, ``Fold.mask_in``); see the module docstring for the rules."""
    planner = _Planner(graph, cs, fold=fold, align=align)
    iterate_to_fixpoint(planner.constrain, max_rounds=len(planner.every) + 1, what="dead-node-elim's removal constraints")
    return planner.plan()


class _Planner:
    """The state of one planning: liveness, the atoms kept so far (and why), the folds."""

    def __init__(self, graph: Graph, cs: ChannelSpaces, *, fold: bool, align: int) -> None:
        self.graph, self.cs, self.fold, self.align = graph, cs, fold, align
        self.fwd, self.bwd = channel_liveness(graph, cs)
        self.conns = {n.name: connectivity(n, cs) for n in graph.nodes if n.kind in WEIGHTED}
        self.roots = {name: cs.roots(t.atoms) for name, t in cs.tracks.items()}
        self.every: set[int] = set()
        live: set[int] = set()
        for name, r in self.roots.items():
            self.every.update(r.tolist())
            live.update(r[self.fwd[name] & self.bwd[name]].tolist())
        self.dead = self.every - live
        self.reasons: dict[int, str] = {}
        self.sources: dict[int, str] = {}  # the full reason, naming the node that pinned the atom
        for root, why in cs.pinned_roots().items():
            if root in self.dead:
                self.reasons[root] = why.split(":")[-1].strip()
                self.sources[root] = why
        self.keep = live | set(self.reasons)
        self.together = [cs.roots(s) for s in cs.together]
        self.aligned = {v.name for n in graph.nodes if n.kind in WEIGHTED for v in (n.inputs[0], n.outputs[0]) if v.name in self.roots} if align > 1 else set()
        self.values = ZeroInputValues(graph)
        self.shared = shared_weights(graph)
        self.folds: dict[str, Fold] = {}

    def _keep(self, atoms: list[int], reason: str) -> None:
        for a in atoms:
            self.keep.add(a)
            self.reasons.setdefault(a, reason)

    def constrain(self) -> bool:
        """One round of every constraint, in order; did any keep more atoms?"""
        changed = [self._whole_groups(), self._one_channel_per_value(), self._aligned_counts(), self._plan_folds()]
        return any(changed)

    def _whole_groups(self) -> bool:
        changed = False
        for group in self.together:
            if any(int(r) in self.keep for r in group) and not all(int(r) in self.keep for r in group):
                self._keep([r for r in group.tolist() if r not in self.keep], "grouped conv keeps whole groups")
                changed = True
        return changed

    def _one_channel_per_value(self) -> bool:
        changed = False
        for r in self.roots.values():
            if len(r) and not any(int(a) in self.keep for a in r):
                self._keep([int(r[0])], "a value keeps at least one channel")
                changed = True
        return changed

    def _aligned_counts(self) -> bool:
        changed = False
        for name in self.aligned:
            r = self.roots[name]
            gone = [int(a) for a in r if int(a) not in self.keep]
            short = (-(len(r) - len(gone))) % self.align
            if gone and short:
                self._keep(gone[:short], f"channel counts aligned to {self.align}")
                changed = True
        return changed

    def _plan_folds(self) -> bool:
        self.folds = {}
        changed = False
        for node in self.graph.nodes:
            if node.kind in WEIGHTED and reads_track(node, self.cs):
                changed = self._plan_fold(node) or changed
        return changed

    def _plan_fold(self, node: Node) -> bool:
        """Fold the constant inputs of ``node`` (or keep them); did it keep more atoms?"""
        x = node.inputs[0].name
        gone = np.array([int(a) not in self.keep for a in self.roots[x]], dtype=bool)
        conn = self.conns[node.name]
        used = conn.any(axis=0) if conn.shape[1] == len(gone) else np.zeros(len(gone), bool)
        removed_const = gone & ~self.fwd[x]
        kept_const = ~gone & ~self.fwd[x] & used
        if node.name in self.shared:
            # a folded channel's weights must be masked, which would change the other users of
            # the weight: constant inputs of a shared weight stay, unfolded
            if removed_const.any():
                self._keep(self.roots[x][removed_const].tolist(), "constant channel read by a shared weight")
                return True
            return False
        result = None
        if self.fold and (removed_const.any() or kept_const.any()):
            result = fold_for(node, np.flatnonzero(removed_const | kept_const), self.values)
            if result is None and removed_const.any() and kept_const.any():
                result = fold_for(node, np.flatnonzero(removed_const), self.values)
        if result is not None:
            result.mask_in = np.intersect1d(result.channels, np.flatnonzero(kept_const))
            self.folds[node.name] = result
        elif removed_const.any():
            self._keep(self.roots[x][removed_const].tolist(), "constant channel that cannot be folded")
            return True
        return False

    def plan(self) -> RemovalPlan:
        """The plan at the fixpoint: masks of the values that shrink, kept-dead counts, dead rows."""
        removed = self.every - self.keep
        masks = {}
        for name, r in self.roots.items():
            m = np.array([int(a) not in removed for a in r], dtype=bool)
            if not m.all():
                masks[name] = m
        kept_dead: dict[str, int] = {}
        sources: dict[str, int] = {}
        for root in self.dead & self.keep:
            why = self.reasons.get(root, "kept")
            kept_dead[why] = kept_dead.get(why, 0) + 1
            source = self.sources.get(root, why)
            sources[source] = sources.get(source, 0) + 1
        return RemovalPlan(removed, masks, self.folds, kept_dead, self._dead_rows(removed), sources)

    def _dead_rows(self, removed: set[int]) -> dict[str, np.ndarray]:
        """Per conv/linear: kept output rows that reach nothing (masked; a shared weight never is)."""
        dead_rows = {}
        for node in self.graph.nodes:
            y = node.outputs[0].name if node.kind in WEIGHTED else None
            if y is None or y not in self.roots or node.name in self.shared:
                continue
            stays = np.array([int(a) not in removed for a in self.roots[y]], dtype=bool)
            rows = np.flatnonzero(stays & ~self.bwd[y] & self.conns[node.name].any(axis=1))
            if len(rows):
                dead_rows[node.name] = rows
        return dead_rows
