"""Channel coupling: which channels must be removed together, as per-OpKind rules.

A value whose channels may be removed gets a **track**: the axis holding its channels and,
per index on that axis, an **atom** id. Channel-wise operators join the atoms of their
operands and result (union-find), so an atom is one channel followed through a chain of
values; removing a channel removes its atom from every value that carries it. Each rule also
records **links** (which input index each output index reads: the same index, an offset, a
repeat, or every index) from which the liveness sweep derives per-channel dependence.

=============  ===========================================================================
kind           rule (``COUPLING_RULES``)
=============  ===========================================================================
conv           output: fresh atoms on axis 1; groups=1 *consumes* the input channels
               (boundary: the weight's in-axis is sliced, constants folded). Depthwise
               (groups = C_in = C_out): output atoms = input atoms (in = out coupling).
               Other grouped convs: fresh atoms, and each group's input + output channels
               form a *together* set: a group goes only whole, so all groups stay equal.
linear         fresh atoms on the last axis; consumes the input's last axis.
add/mul/       elementwise: operands, right-aligned (numpy broadcasting), share atoms on
pointwise      the channel axis; a size-1 (broadcast) operand is read by every channel.
norm           batch/instance: per channel (axis 1), atoms pass, params sliced. layer
               (normalised axes hold the channel axis), group, lrn: the statistics couple
               ALL channels, so removing one changes every output: atoms pinned (kept).
concat/split   along the channel axis: output atoms = the inputs' atoms at offsets (split:
               slices); along another axis: atoms shared.
pool/softmax   over other axes: atoms pass (the axis index moves when dims are dropped);
               over the channel axis: pinned.
reshape        transpose: the axis moves. reshape keeping the channel dim whole (dims
               around it merged or split): pass. Flatten C×S -> features with the channel
               outermost: feature f carries the atom of channel f // S (repeat link).
               gather/slice/pad on another axis: pass. gather of a 1-D index along the
               channel axis (a fused channel shuffle): output atoms = input atoms[index].
               Anything else (expand, unflatten,
               the channel dim split or merged with outer dims): pinned.
constant       a data constant adopts the track of the operand it is combined with.
output         pinned: the model's output shape never changes.
matmul         two activations batched over the same tracked leading axis (attention heads:
               Q·Kᵀ, A·V): atoms join and pass; anything else pinned, result untracked.
attention,     pinned, result untracked (a fused attention op; opaque semantics); an opaque
opaque         resize (``op="resize"``, spatial axes only) passes its atoms, like pooling.
reshape (heads) splitting the channel dim H·D into (H, D): each head's D channels are one
               atom tracked on the head axis (a head goes whole); merging back is a flatten.
=============  ===========================================================================

``param_slices`` (``SLICE_RULES``) says which Param axis is indexed by which track (the dead-node pass slices
exactly these). A Param used by two nodes is never sliced: its atoms are pinned. A constant an
exporter stored once for equal tensors (BN stats, zero biases) is not such a Param: the ONNX
frontend gives each use its own copy (``Param.per_use_copy``), so only tied weights pin.

Modules by role: ``tracks`` (tracks, links, the union-find ``ChannelSpaces`` and the builder the
rules write through), ``rules`` (``COUPLING_RULES``, ``channel_spaces``), ``layout`` (the reshape,
concat and split rules), ``slices`` (``SLICE_RULES``, ``param_slices``).
"""
from __future__ import annotations

from pai_compiler.passes.analysis.coupling.rules import COUPLING_RULES, channel_spaces
from pai_compiler.passes.analysis.coupling.slices import SLICE_RULES, param_slices
from pai_compiler.passes.analysis.coupling.tracks import ChannelSpaces, Link, Track, dims_equal

__all__ = ["Track", "Link", "ChannelSpaces", "COUPLING_RULES", "SLICE_RULES", "channel_spaces", "param_slices", "dims_equal"]
