"""Inference fusions of a SparseModule: BatchNorm into conv, ReLU into conv, convs packed for oneDNN.

* ``fold_batch_norms``: an inference BatchNorm that alone reads a conv's output is folded into
  it, ``W' = W * g / sqrt(v + eps)`` per output channel, ``b' = (b - m) * g / sqrt(v + eps) + beta``
  (zeros stay zeros, so the sparsity is unchanged); the norm node passes its input through.
* ``fuse_relus``: a ReLU that alone reads a conv's (folded) output is applied by the conv.
* ``pack_layers``: every 2-d conv runs a :class:`~pai_compiler.backends.sparse_kernels.PackedConv2d`
  as its dense layer (weight reordered once for oneDNN, ReLU fused), every linear a
  ``DenseLinear`` (weight contiguous (out, in): no transpose copy per call).
All three are exact up to float rounding (checked by ``sparse_select`` against the IR semantics).
"""
from __future__ import annotations

import torch

from pai_compiler.backends.sparse_kernels import DenseLinear, PackedConv2d
from pai_compiler.backends.torch_sparse import Kernel, SparseModule
from pai_compiler.ir import Node, OpKind

__all__ = ["fold_batch_norms", "fuse_relus", "pack_layers", "fuse_for_inference"]


def _sole_reader(module: SparseModule, node: Node) -> Node | None:
    """The one node reading ``node``'s single output (None if several, none, or a graph output)."""
    outputs = {v.name for v in module.graph.outputs}
    if len(node.outputs) != 1 or node.outputs[0].name in outputs:
        return None
    uses = list(node.outputs[0].uses)
    return uses[0] if len(uses) == 1 and uses[0].inputs[0] is node.outputs[0] else None


def fold_batch_norms(module: SparseModule) -> int:
    """Fold each BatchNorm that alone reads a conv's output into the conv; returns how many."""
    readers = module.readers()
    folded = 0
    for conv in module.graph.nodes:
        norm = _sole_reader(module, conv) if conv.kind is OpKind.CONV else None
        if norm is None or norm.kind is not OpKind.NORM or norm.attrs.get("type") != "batch":
            continue
        weight_param, bias_param = conv.params["weight"], conv.params.get("bias")
        owned = [p for p in (weight_param, bias_param) if p is not None]
        if weight_param.out_axis != 0 or any(readers.get(p.name) != 1 or p.name not in module.keys for p in owned):
            continue
        if not all(p.name in module.keys for p in norm.params.values()) or conv.name in module.folded_bias:
            continue
        stats = {role: getattr(module, module.keys[p.name]) for role, p in norm.params.items()}
        factor = (stats["scale"] if "scale" in stats else 1.0) / torch.sqrt(stats["var"] + norm.attrs.get("epsilon", 0.0))
        weight = getattr(module, module.keys[weight_param.name])
        setattr(module, module.keys[weight_param.name], weight * factor.reshape(-1, *[1] * (weight.dim() - 1)))
        bias = getattr(module, module.keys[bias_param.name]) if bias_param is not None else torch.zeros_like(factor)
        folded_bias = (bias - stats["mean"]) * factor + (stats["bias"] if "bias" in stats else 0.0)
        module.folded_bias[conv.name] = module.add_buffer(f"{conv.name}_folded_bias", folded_bias.contiguous())
        module.passthrough.add(norm.name)
        folded += 1
    return folded


def fuse_relus(module: SparseModule) -> int:
    """Let each conv apply the ReLU that alone reads its output (through a folded norm); returns how many."""
    fused = 0
    for conv in module.graph.nodes:
        if conv.kind is not OpKind.CONV:
            continue
        reader = _sole_reader(module, conv)
        if reader is not None and reader.name in module.passthrough:
            reader = _sole_reader(module, reader)
        if reader is not None and reader.kind is OpKind.POINTWISE and reader.attrs.get("op") == "relu" and "const" not in reader.params:
            module.fused_relu.add(conv.name)
            module.passthrough.add(reader.name)
            fused += 1
    return fused


def pack_layers(module: SparseModule) -> int:
    """Give every 2-d conv a packed dense kernel and every 2-d linear a contiguous one; returns how many."""
    it = module.interpreter()
    packed = 0
    for node in module.graph.nodes:
        weight = node.params.get("weight")
        if node.kind not in (OpKind.CONV, OpKind.LINEAR) or weight is None or weight.name not in module.keys:
            continue
        a = node.attrs
        kernel: Kernel
        if node.kind is OpKind.CONV and len(weight.shape) == 4:
            kernel = PackedConv2d(it.oi_weight(weight), module.conv_bias(it, node), a["pads"], a["strides"], a["dilations"],
                                  a["groups"], relu=node.name in module.fused_relu)
        elif node.kind is OpKind.LINEAR and len(weight.shape) == 2:
            bias = it.weight(node.params["bias"]) if "bias" in node.params else None
            kernel = DenseLinear(it.oi_weight(weight), bias, alpha=a.get("alpha", 1.0), beta=a.get("beta", 1.0))
        else:
            continue
        module.install(node.name, kernel, dense=True)
        packed += 1
    return packed


def fuse_for_inference(module: SparseModule) -> dict[str, int]:
    """All three fusions, in order; the counts by kind."""
    counts = {"batch_norms_folded": fold_batch_norms(module), "relus_fused": fuse_relus(module), "layers_packed": pack_layers(module)}
    module.invalidate_plans()  # a forward compiled before the folds would read the unfolded weights
    return counts
