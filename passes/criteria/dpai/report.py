"""The report's per-pixel measurement of one mask, holding as little per weight as it can.

* ``ref`` (DPaI's convention, ``count_paths(..., "ref")``): all-ones input, float32, model
  pooling, each conv/linear input divided by its max m_l, log P~ = log(sum(out)) + sum_l log m_l.
  With G = dlogP~/dM by autograd, a kept weight is effective if G != 0; a kernel or node counts
  if it holds an effective weight. The float32 masks are the autograd leaves (the graph keeps
  them: 4 bytes per weight); each layer's G is reduced to its flags as soon as autograd has
  accumulated it, then dropped.
* ``exact`` (``count_paths(..., "exact")``): float64, sum pooling, log space, no gradient;
  each layer's float64 mask is built when the interpreter asks for it and freed after use.

Masks come from ``mask_of(layer)``: the layer's bool mask, flat in (out, in, taps) order.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pai_compiler.ir import Graph
from pai_compiler.passes.analysis.bindings import static_batch
from pai_compiler.passes.analysis.paths import count_paths
from pai_compiler.passes.criteria.dpai.layout import LayerInfo, Layout
from pai_compiler.passes.criteria.dpai.pixel_paths import finite

if TYPE_CHECKING:
    import torch

__all__ = ["MaskOf", "reference_metrics", "natural"]

MaskOf = Callable[[LayerInfo], "torch.Tensor"]


def natural(flat: torch.Tensor, layer: LayerInfo) -> torch.Tensor:
    """A layer's flat (oi order) tensor viewed in the weight's own axis order."""
    inverse = tuple(int(a) for a in np.argsort(layer.perm))
    view = flat.view(layer.oi_shape)
    return view if inverse == tuple(range(len(inverse))) else view.permute(inverse)


class _ByLayer(Mapping[str, Any]):
    """A mapping over the layout's layer names whose values are built on access."""

    layers: dict[str, LayerInfo]

    def __contains__(self, name: object) -> bool:  # without building the tensor
        return name in self.layers

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


class _LazyMasks(_ByLayer):
    """name -> the layer's mask as a ``dtype`` weight, built on each access (never cached)."""

    def __init__(self, layout: Layout, mask_of: MaskOf, dtype: torch.dtype) -> None:
        self.layers, self.mask_of, self.dtype = {layer.name: layer for layer in layout.layers}, mask_of, dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        layer = self.layers[name]
        return natural(self.mask_of(layer).to(self.dtype), layer)


def reference_metrics(graph: Graph, layout: Layout, mask_of: MaskOf, device: Any, bind: Mapping[str, int]) -> dict[str, Any]:
    """log_paths / nodes / kernels / params (ref convention), log_paths_exact and layer_nodes."""
    per_sample = math.log(static_batch(graph))  # per sample, as node-path counts (a fixed batch B > 1 divides)
    stats = _ref(graph, layout, mask_of, device, bind)
    layer_nodes = stats.pop("layer_nodes")
    if stats["log_paths"] is not None:
        stats["log_paths"] -= per_sample
    return {**stats, "log_paths_exact": finite(_exact(graph, layout, mask_of, device, bind) - per_sample), "layer_nodes": layer_nodes}


def _ref(graph: Graph, layout: Layout, mask_of: MaskOf, device: Any, bind: Mapping[str, int]) -> dict[str, Any]:
    import torch  # heavy optional dependency: only DPaI's report needs it

    n = len(layout.layers)
    nodes, kernels, params = [0] * n, [0] * n, [0] * n
    leaves = _Leaves(graph, layout, mask_of)

    def reduce(layer: LayerInfo) -> Callable[[torch.Tensor], None]:
        def hook(leaf: torch.Tensor) -> None:
            assert leaf.grad is not None
            eff = (leaf.grad != 0) & mask_of(layer)
            leaf.grad = None
            nodes[layer.index] = int(eff.view(layer.out_ch, -1).any(1).sum())
            kernels[layer.index] = int(eff.view(layer.kernels, layer.taps).any(1).sum())
            params[layer.index] = int(eff.sum())

        return hook

    leaves.hook = reduce
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(leaves.pack, leaves.unpack):
        log_p = count_paths(graph, "ref", bind, device=device, weights=leaves, keep_values=False, on_node=leaves.done).log_paths
    if log_p.requires_grad:
        with torch.autograd.graph.saved_tensors_hooks(leaves.pack, leaves.unpack):
            torch.autograd.backward(log_p, inputs=[leaf for leaf in leaves.made if leaf is not None])
    log_value = float(log_p.detach().float())
    return {"log_paths": finite(log_value), "nodes": sum(nodes), "kernels": sum(kernels), "params": sum(params), "layer_nodes": nodes}


class _Leaves(_ByLayer):
    """The float32 mask leaves, made when the interpreter first reads a layer.

    Autograd saves no copy of them (``pack`` keeps (layer, view geometry), ``unpack`` rebuilds
    the view from the bool mask), so each leaf's data is freed after its last reading node:
    only its metadata stays, for gradient accumulation.
    """

    def __init__(self, graph: Graph, layout: Layout, mask_of: MaskOf) -> None:
        self.layout, self.mask_of = layout, mask_of
        self.layers = {layer.name: layer for layer in layout.layers}
        self.made: list[Any] = [None] * len(layout.layers)
        self.storage: dict[int, int] = {}  # data pointer -> layer index
        self.last: dict[str, Any] = {}
        for node in graph.nodes:
            for p in node.params.values():
                self.last[p.name] = node
        self.hook: Callable[[LayerInfo], Callable[[Any], None]] | None = None

    def __getitem__(self, name: str) -> Any:
        import torch  # heavy optional dependency

        layer = self.layers[name]
        leaf = self.made[layer.index]
        if leaf is None:
            leaf = self.mask_of(layer).to(torch.float32).requires_grad_(True)
            assert self.hook is not None
            leaf.register_post_accumulate_grad_hook(self.hook(layer))
            self.made[layer.index] = leaf
            self.storage[leaf.untyped_storage().data_ptr()] = layer.index
        return natural(leaf, layer)

    def done(self, node: Any, outs: Any) -> None:
        """After ``node``: free the data of the leaves it was the last to read."""
        for p in node.params.values():
            layer = self.layers.get(p.name)
            leaf = self.made[layer.index] if layer is not None else None
            if leaf is not None and self.last.get(p.name) is node and leaf.untyped_storage().nbytes():
                del self.storage[leaf.untyped_storage().data_ptr()]  # the address may be reused
                leaf.untyped_storage().resize_(0)

    def pack(self, t: Any) -> Any:
        index = self.storage.get(t.untyped_storage().data_ptr()) if t.layout is _strided() and t.untyped_storage().nbytes() else None
        return t if index is None else (index, t.shape, t.stride(), t.storage_offset())

    def unpack(self, packed: Any) -> Any:
        import torch  # heavy optional dependency

        if not isinstance(packed, tuple):
            return packed
        index, shape, stride, offset = packed
        return self.mask_of(self.layout.layers[index]).to(torch.float32).as_strided(shape, stride, offset)


def _strided() -> Any:
    import torch  # heavy optional dependency

    return torch.strided


def _exact(graph: Graph, layout: Layout, mask_of: MaskOf, device: Any, bind: Mapping[str, int]) -> float:
    import torch  # heavy optional dependency: only DPaI's report needs it

    with torch.no_grad():
        return float(count_paths(graph, "exact", bind, device=device, weights=_LazyMasks(layout, mask_of, torch.float64), keep_values=False).log_paths)
