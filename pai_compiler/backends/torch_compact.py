"""PyTorch compact module: an ``nn.Module`` that runs the compacted IR with its own Parameters.

``CompactModule(graph)`` copies every floating-point Param of the (compacted) graph into the
module: conv/linear weights and biases (folded biases included), norm scale/bias and learned
constants with an origin (positional embeddings, class tokens, biases lowered as Add) become
``nn.Parameter``; BN running statistics, folded bias maps and anonymous constants become
buffers; each mask becomes a ``<key>_mask`` buffer and the forward uses ``W ⊙ M``, so pruned
weights get zero gradient and stay pruned. ``forward`` is the IR interpreter's ``real``
semantics with these tensors, so the module computes exactly what the compact ONNX model
computes and trains like any module (``.to(device)``, optimizers, ``state_dict``). BatchNorm
uses its running statistics (the IR's inference semantics) in both modes. The module is
self-contained: ``torch.save(module)`` / ``torch.load(..., weights_only=False)`` round-trip it
(the source ``nn.Module`` of a torch-lowered graph is not kept).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch  # a module class needs nn.Module at import time (like pai_compiler.interp)
from torch import nn

from pai_compiler.interp import Interpreter, is_float_array, torch_ready
from pai_compiler.ir import WEIGHTED_KINDS, Graph, OpKind, Param

__all__ = ["CompactModule", "compact_module"]


class _TensorInterpreter(Interpreter):
    """The real-mode interpreter reading every Param from ``weights`` (module tensors)."""

    def const(self, p: Param) -> torch.Tensor:
        if p.name in self.weights:
            return self.weights[p.name]
        return super().const(p)


def _trainable(graph: Graph) -> dict[str, bool]:
    """Param name -> trainable, from the role it plays in its node."""
    roles: dict[str, bool] = {}
    for node in graph.nodes:
        for key, p in node.params.items():
            if node.kind in WEIGHTED_KINDS:
                train = True
            elif node.kind is OpKind.NORM:
                train = key in ("scale", "bias")
            elif node.attrs.get("folded") == "bias_map":
                train = False
            else:  # pointwise constants, data constants: learned tensors have a source name
                train = bool(p.origin) and p.data.size > 1
            roles[p.name] = roles.get(p.name, False) or train
    return roles


class CompactModule(nn.Module):
    """Runs ``graph`` (typically after ``dead-node-elim``) with trainable module tensors."""

    def __init__(self, graph: Graph) -> None:
        super().__init__()
        self.graph = graph.clone()
        # the clone's meta is its own dict; the live source nn.Module (torch frontend) is not
        # part of the compact module and refuses pickling, so torch.save(module) would fail
        self.graph.meta.pop("torch_module", None)
        self.keys: dict[str, str] = {}
        self.masked: dict[str, str] = {}
        trainable = _trainable(self.graph)
        used: set[str] = set()
        stored: dict[object, tuple[str, tuple[int, ...]]] = {}  # one tensor per stored weight (layout twins share it)
        for p in self.graph.params():
            if not is_float_array(p.data):
                continue
            first = stored.get(p.storage)
            if first is not None and first[1] == p.shape and p.mask is None:
                self.keys[p.name] = first[0]
                continue
            key = re.sub(r"\W", "_", p.name).strip("_") or "param"
            while key in used or hasattr(self, key):
                key += "_"
            used.add(key)
            self.keys[p.name] = key
            stored.setdefault(p.storage, (key, p.shape))
            data = torch_ready(p.data)
            tensor = torch.tensor(data.astype(np.float32) if data.dtype == np.float64 else data)
            if trainable.get(p.name, False):
                self.register_parameter(key, nn.Parameter(tensor))
            else:
                self.register_buffer(key, tensor)
            if p.mask is not None:
                self.register_buffer(key + "_mask", torch.from_numpy(p.mask.astype(np.float32)).to(tensor.dtype))
                self.masked[p.name] = key + "_mask"

    def tensors(self) -> dict[str, torch.Tensor]:
        """Param name -> the tensor the forward uses (masked where a mask exists)."""
        out: dict[str, torch.Tensor] = {}
        for name, key in self.keys.items():
            t = getattr(self, key)
            if name in self.masked:
                t = t * getattr(self, self.masked[name])
            out[name] = t
        return out

    def forward(self, *inputs: torch.Tensor) -> Any:
        weights = self.tensors()
        ref = next(iter(weights.values()), None)
        dtype = ref.dtype if ref is not None else torch.float32
        device = ref.device if ref is not None else (inputs[0].device if inputs else "cpu")
        outs = _TensorInterpreter(self.graph, mode="real", dtype=dtype, device=device, weights=weights).run(list(inputs)).outputs
        return outs[0] if len(outs) == 1 else tuple(outs)

    def export_masks(self) -> Mapping[str, torch.Tensor]:
        return {name: getattr(self, key) for name, key in self.masked.items()}


def compact_module(graph: Graph) -> CompactModule:
    """An ``nn.Module`` for ``graph`` (run ``dead-node-elim`` first for the compact one)."""
    return CompactModule(graph)
