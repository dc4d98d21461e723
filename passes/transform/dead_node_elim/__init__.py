"""Dead-node elimination: remove every channel without an input->output dependence, exactly.

Per tracked channel (``coupling``) two booleans: **F** — its value depends on the model
input; **B** — it influences the model output. Both are swept at channel granularity over the
coupling links, conv/linear through the kept (out, in) pairs of their masks; every rule
over-approximates real dependence (a kept weight is assumed to carry it), so a channel found
dead is dead. A channel atom is **removed** when no value carrying it is F ∧ B:

* ¬B: nothing downstream reads it — dropped outright.
* ¬F: input-independent, a constant tensor c (a bias through BN/ReLU/GELU…). Its
  contribution to each consuming conv/linear, ``K = layer(x restricted to those channels,
  no bias)`` (real interpreter, float64, masked weights), is **folded**: uniform over the
  non-channel axes -> added to the layer's bias (else to the running mean of a BN or the
  constant of an Add that alone reads the layer: ``BN(y + k) = BN_{μ-k}(y)``; else a new
  bias Param). Not uniform (padding makes a conv of a constant vary at the borders) -> a
  constant map ``K[0:1]`` added right after the layer (``pointwise add``, "bias map").

Constraints, to a fixpoint (each only keeps more, and keeping a channel is always exact):
pinned atoms (coupling: LayerNorm/GroupNorm statistics, outputs, attention chains, shared
Params); a grouped conv's group goes whole; every tracked value keeps ≥ 1 channel; a fold
must be possible (a non-uniform K needs static non-batch dims and a batch-leading output);
with ``align=N`` conv/linear inputs and outputs keep a multiple of N channels where they can
(odd widths fall off ONNX Runtime's fast conv kernels: see docs/compact_speed.md).

Kept weights are tightened too: a kept weight reading a constant channel that stays (coupled
to a live channel elsewhere, e.g. by a residual add) is folded and masked, and a kept weight
writing a channel that reaches nothing is masked. (A constant an exporter de-duplicated is one
Param per use, ``Param.per_use_copy``: it is sliced per use like any other.) A weight that several nodes use (tied
weights, a layer applied twice, W and Wᵀ) is a boundary: its channels are pinned, it is never
masked here and nothing is folded into it (its constant inputs stay), since any change would
reach its other uses; a shared bias gets a folded constant as an add after the layer. The
pass runs to a fixpoint (a grouped conv left with one group frees its inputs), so running it
twice changes nothing.

Exactness: the removed channels of a value are each either constant (their exact
contribution is folded) or read by nothing that reaches the output, so the compact model
computes the masked model's function. MACs: every kept weight of the compact model joins an
F input channel to a B output channel, so its nonzero conv/linear MACs equal the masked
model's effective MACs (``flops``) whenever channel-level reachability equals node-path's
element-level one (every position of a live channel is live, as in CNNs with whole kernels
and a global-pool head, and the example models' ERK masks); they are an upper bound when reachability is
partial over positions (a sparse kernel at the borders, a flatten head with sparse columns) or
when channels stay pinned (LayerNorm, attention) that node-path's identity rules call dead.
Weight-free nodes (norm, pointwise, pool, add) shrink with their channels and bias maps add
one MAC per element. The pass's ``PassResult.report`` is a ``CompactReport`` (per-layer
channel counts, folds, changed Params).

Modules by role: ``liveness`` (F and B per channel), ``fold`` (constant contributions and
where they go), ``plan`` (the constraints, to a fixpoint), ``apply`` (carrying a plan out),
``report`` (the CompactReport), ``transform`` (the pass: rounds to a fixpoint).
"""
from __future__ import annotations

from pai_compiler.passes.transform.dead_node_elim.liveness import channel_liveness
from pai_compiler.passes.transform.dead_node_elim.plan import RemovalPlan, plan_removal
from pai_compiler.passes.transform.dead_node_elim.report import CompactReport, FoldRecord, LayerChange, compact_report_of
from pai_compiler.passes.transform.dead_node_elim.transform import DeadNodeElimPass

__all__ = [
    "DeadNodeElimPass",
    "CompactReport",
    "LayerChange",
    "FoldRecord",
    "compact_report_of",
    "channel_liveness",
    "plan_removal",
    "RemovalPlan",
]
