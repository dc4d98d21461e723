"""Applying a removal plan: mask dead kept weights, slice Params and shapes, fix attributes, write folds.

Tightening first (a kept weight reading a folded constant channel that stays, or writing a
channel that reaches nothing, is masked — a dense excluded layer has those weights zeroed),
then every Param indexed by a shrinking value is sliced on that axis (``param_slices``) and
the value's shape shrinks; grouped convs, linear features, Reshape targets, channel gathers
(fused shuffles) and Split sizes follow; last, each fold is added to its layer's output. Returns the round's CompactReport.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pai_compiler.ir import Graph, Node, OpKind, Param
from pai_compiler.passes.analysis.coupling import ChannelSpaces, param_slices
from pai_compiler.passes.transform.dead_node_elim.fold import bias_map, fold_bias
from pai_compiler.passes.transform.dead_node_elim.liveness import WEIGHTED
from pai_compiler.passes.transform.dead_node_elim.plan import RemovalPlan
from pai_compiler.passes.transform.dead_node_elim.report import CompactReport, FoldRecord, LayerChange

__all__ = ["apply_plan", "tighten"]


@dataclass
class _RoundLog:
    """What one application changed, gathered before it becomes a CompactReport."""

    before: dict[str, tuple[str, str, tuple[int, ...]]] = field(default_factory=dict)  # weight -> (node, op, shape)
    folds: list[FoldRecord] = field(default_factory=list)
    reshapes: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    weights_dropped: int = 0
    changed_params: list[str] = field(default_factory=list)


def apply_plan(graph: Graph, cs: ChannelSpaces, plan: RemovalPlan) -> CompactReport:
    """Carry out ``plan`` on ``graph`` (through Graph methods) and report what changed."""
    log = _RoundLog()
    for node in _weighted(graph):
        fold = plan.folds.get(node.name)
        dropped = tighten(graph, node, plan.dead_rows.get(node.name), fold.mask_in if fold is not None else None)
        if dropped:
            log.weights_dropped += dropped
            log.changed_params.append(node.params["weight"].name)
    for node in _weighted(graph):
        w = node.params["weight"]
        log.before[w.name] = (node.name, node.kind.value, tuple(w.shape))
    groups_before = {n.name: (int(n.attrs.get("groups", 1)), n.params["weight"].shape[0]) for n in graph.nodes if n.kind is OpKind.CONV}
    _slice_values(graph, cs, plan.keep, log)
    _follow_shapes(graph, plan.keep, groups_before, log)
    _write_folds(graph, plan, log)
    return CompactReport(
        layers=_layer_changes(graph, log), folds=tuple(log.folds), reshapes=tuple(log.reshapes), splits=tuple(log.splits),
        weights_dropped=log.weights_dropped, changed_params=tuple(sorted(set(log.changed_params))),
        kept_dead_channels=tuple(plan.kept_dead.items()), kept_dead_sources=tuple(plan.kept_dead_sources.items()), removed_atoms=len(plan.removed), rounds=1,
    )


def _weighted(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if n.kind in WEIGHTED]


def tighten(graph: Graph, node: Node, rows: np.ndarray | None, cols: np.ndarray | None) -> int:
    """Drop kept weights of output ``rows`` / input ``cols``; return how many were dropped."""
    w = node.params["weight"]
    keep = w.mask_or_ones().copy()
    oi = w.to_oi(keep)  # a view: writes go to ``keep``
    groups = int(node.attrs.get("groups", 1)) if node.kind is OpKind.CONV else 1
    per_out, per_in = oi.shape[0] // groups, oi.shape[1]
    before = int(keep.sum())
    if rows is not None:
        oi[rows] = False
    for i in (cols if cols is not None else []):
        g = int(i) // per_in
        oi[g * per_out:(g + 1) * per_out, int(i) - g * per_in] = False
    dropped = before - int(keep.sum())
    if dropped:
        if w.prunable:
            graph.set_mask(w, keep)
        else:  # a dense (excluded) layer: zero the weights instead of masking them
            graph.set_param_data(w, np.where(keep, w.data, 0).astype(w.data.dtype))
    return dropped


def _slice_param(graph: Graph, p: Param, axis: int, keep: np.ndarray) -> None:
    index = np.flatnonzero(keep)
    mask = None if p.mask is None else np.take(p.mask, index, axis=axis)
    graph.set_mask(p, None)
    graph.set_param_data(p, np.ascontiguousarray(np.take(p.data, index, axis=axis)))
    if mask is not None:
        graph.set_mask(p, mask)


def _slice_values(graph: Graph, cs: ChannelSpaces, keep: dict[str, np.ndarray], log: _RoundLog) -> None:
    """Slice every Param indexed by a shrinking value (once per Param and axis), then shrink the values."""
    done: set[tuple[int, int]] = set()
    for node in graph.nodes:
        for p, axis, value in param_slices(node, cs):
            if value.name in keep and (id(p), axis) not in done:
                done.add((id(p), axis))
                _slice_param(graph, p, axis, keep[value.name])
                log.changed_params.append(p.name)
    for name, m in keep.items():
        v = graph.value(name)
        shape = list(v.shape)  # type: ignore[arg-type]
        shape[cs.tracks[name].axis] = int(m.sum())
        graph.set_shape(v, tuple(shape))


def _follow_shapes(graph: Graph, keep: dict[str, np.ndarray], groups_before: dict[str, tuple[int, int]], log: _RoundLog) -> None:
    """Attributes that state channel counts follow the new shapes: conv groups, linear features, Reshape, Split."""
    for node in graph.nodes:
        changed_out = any(v.name in keep for v in node.outputs)
        if node.kind is OpKind.CONV and node.name in groups_before:
            groups, n_out = groups_before[node.name]
            if groups > 1 and changed_out:
                graph.set_attr(node, "groups", node.params["weight"].shape[0] // (n_out // groups))
        elif node.kind is OpKind.LINEAR:
            w = node.params["weight"]
            if (w.shape[w.out_axis], w.shape[w.in_axis]) != (node.attrs.get("out_features"), node.attrs.get("in_features")):  # type: ignore[index]
                graph.set_attr(node, "out_features", w.shape[w.out_axis])
                graph.set_attr(node, "in_features", w.shape[w.in_axis])  # type: ignore[index]
        elif node.kind is OpKind.RESHAPE and node.attrs.get("op") == "gather" and node.inputs[0].name in keep and changed_out:
            kept_in = keep[node.inputs[0].name]
            index = np.asarray(node.attrs["indices"], dtype=np.int64) % len(kept_in)
            position = np.cumsum(kept_in) - 1  # an input channel's index once the removed ones are gone
            new = position[index[kept_in[index]]]
            graph.set_attr(node, "indices", new.tolist())
            graph.set_attr(node, "indices_shape", [len(new)])
            log.reshapes.append(node.name)
        elif node.kind is OpKind.RESHAPE and node.attrs.get("op") == "reshape" and changed_out and node.attrs.get("shape") is not None:
            if "source_shape" not in node.attrs:  # the exported model's target: a writer may reuse its symbolic entries
                graph.set_attr(node, "source_shape", list(node.attrs["shape"]))
            graph.set_attr(node, "shape", list(node.outputs[0].shape or ()))
            log.reshapes.append(node.name)
        elif node.kind is OpKind.SPLIT and node.inputs[0].name in keep:
            graph.set_attr(node, "sizes", [int(v.shape[node.attrs["axis"]]) for v in node.outputs])  # type: ignore[index]
            log.splits.append(node.name)


def _write_folds(graph: Graph, plan: RemovalPlan, log: _RoundLog) -> None:
    """Each fold, restricted to its layer's kept outputs, into a bias (or BN mean, add constant) or a bias map."""
    for name, f in plan.folds.items():
        node = graph.node(name)
        out_keep = plan.keep.get(node.outputs[0].name)
        if f.bias is not None:
            where, changed = fold_bias(graph, node, f.bias if out_keep is None else f.bias[out_keep])
        else:
            assert f.map is not None
            axis = 1 if node.kind is OpKind.CONV else f.map.ndim - 1
            where, changed = bias_map(graph, node, f.map if out_keep is None else np.compress(out_keep, f.map, axis=axis))
        log.changed_params.append(changed)
        log.folds.append(FoldRecord(name, int(len(f.channels)), where))


def _layer_changes(graph: Graph, log: _RoundLog) -> tuple[LayerChange, ...]:
    """Per weight (in the order first seen): shape before and after, out/in channel counts."""
    rows = dict(log.before)
    weights: dict[str, Param] = {}
    for node in _weighted(graph):
        w = weights[node.params["weight"].name] = node.params["weight"]
        rows.setdefault(w.name, (node.name, node.kind.value, tuple(w.shape)))
    changes = []
    for param, (node_name, op, before) in rows.items():
        w = weights[param]  # layers are never removed, so every weight seen before is still there
        after = tuple(w.shape)
        counts = [(before[axis], after[axis]) if axis is not None else None for axis in (w.out_axis, w.in_axis)]
        changes.append(LayerChange(param, node_name, op, before, after, counts[0], counts[1]))
    return tuple(changes)

