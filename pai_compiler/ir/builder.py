"""Build small IR graphs by calls (``b.relu(b.conv(b.input((1, 3, 8, 8)), 4, 3))``), then ``build()``.

Each method adds one node, names it ``<role><n>`` (``conv1``, ``fc2``; its output Value has the
same name, its weight is ``<node>.weight``) and returns the output Value, with its shape
computed the way the frontends compute it (conv/pool output size
``(size + 2*pad - dilation*(kernel-1) - 1) // stride + 1``). Attributes are the ones the
frontends write, so the interpreter and every pass read builder graphs as they read lowered
models. Weights are ones, or He-normal (``N(0, 2/fan_in)``) when the builder has an ``rng``.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pai_compiler.ir.core import Graph
from pai_compiler.ir.nodes import Dim, OpKind, Param, Value

__all__ = ["GraphBuilder"]


class GraphBuilder:
    """Adds nodes to one Graph; ``build()`` adds the outputs, verifies and hands the graph over."""

    def __init__(self, name: str = "graph", *, rng: np.random.Generator | None = None, dtype: str = "float32") -> None:
        self.graph = Graph(name)
        self.rng = rng
        self.dtype = dtype
        self._counts: Counter[str] = Counter()

    # ---- generic ------------------------------------------------------------------------------
    def fresh(self, role: str) -> str:
        """The next unused ``<role><n>`` name (n counts per role from 1)."""
        while True:
            self._counts[role] += 1
            name = f"{role}{self._counts[role]}"
            if self.graph.fresh_name(name) == name:
                return name

    def op(self, kind: OpKind, inputs: Sequence[Value], shape: tuple[Dim, ...] | None, *, role: str | None = None,
           params: Mapping[str, Param] | None = None, attrs: Mapping[str, Any] | None = None, name: str | None = None) -> Value:
        """Add any one-output node; the output Value takes the node's name."""
        name = name or self.fresh(role or kind.value)
        node = self.graph.add_node(kind, name, inputs, [(name, shape, self.dtype)], params=params, attrs=attrs)
        return node.outputs[0]

    def input(self, shape: tuple[Dim, ...], name: str = "x") -> Value:
        return self.op(OpKind.INPUT, (), shape, name=name)

    def param(self, name: str, shape: tuple[int, ...], *, prunable: bool = True, out_axis: int = 0,
              in_axis: int | None = 1, data: np.ndarray | None = None) -> Param:
        """A weight (ones, or He-normal with the builder's rng) or a constant (``prunable=False``)."""
        if data is None:
            fan_in = math.prod(shape) // max(shape[out_axis], 1) if shape else 1
            data = (np.ones(shape, np.float32) if self.rng is None or not prunable
                    else (self.rng.standard_normal(shape) * math.sqrt(2.0 / max(fan_in, 1))).astype(np.float32))
        return Param(name, np.asarray(data), prunable=prunable, out_axis=out_axis, in_axis=in_axis)

    def weight_of(self, value: Value, key: str = "weight") -> Param:
        """The ``key`` param of the node that produced ``value``."""
        assert value.producer is not None
        return value.producer.params[key]

    def set_mask(self, value: Value, mask: np.ndarray | None, key: str = "weight") -> None:
        self.graph.set_mask(self.weight_of(value, key), mask)

    # ---- weighted layers --------------------------------------------------------------------------
    def conv(self, x: Value, out_channels: int, kernel: int, *, stride: int = 1, pad: int = 0, dilation: int = 1,
             groups: int = 1, bias: bool = False, weight: Param | None = None) -> Value:
        """A 2-D convolution (NCHW), square kernel, symmetric padding."""
        batch, channels, height, width = _require_shape(x, 4)
        name = self.fresh("conv")
        params = {"weight": weight or self.param(f"{name}.weight", (out_channels, int(channels) // groups, kernel, kernel))}
        if bias:
            params["bias"] = self.param(f"{name}.bias", (out_channels,), prunable=False, data=np.zeros(out_channels, np.float32))
        spatial = [(int(s) + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1 for s in (height, width)]
        attrs = {"strides": [stride] * 2, "pads": [pad] * 4, "dilations": [dilation] * 2, "groups": groups, "kernel_shape": [kernel] * 2}
        return self.op(OpKind.CONV, [x], (batch, out_channels, *spatial), params=params, attrs=attrs, name=name)

    def conv_transpose(self, x: Value, out_channels: int, kernel: int, *, stride: int = 1, pad: int = 0, output_padding: int = 0,
                       dilation: int = 1, groups: int = 1, bias: bool = False, weight: Param | None = None) -> Value:
        """A 2-D transposed convolution (NCHW), square kernel, symmetric padding; weight (in, out/groups, k, k)."""
        batch, channels, height, width = _require_shape(x, 4)
        name = self.fresh("deconv")
        shape = (int(channels), out_channels // groups, kernel, kernel)
        params = {"weight": weight or self.param(f"{name}.weight", shape, out_axis=1, in_axis=0)}
        if bias:
            params["bias"] = self.param(f"{name}.bias", (out_channels,), prunable=False, data=np.zeros(out_channels, np.float32))
        spatial = [(int(s) - 1) * stride - 2 * pad + dilation * (kernel - 1) + 1 + output_padding for s in (height, width)]
        attrs = {"strides": [stride] * 2, "pads": [pad] * 4, "dilations": [dilation] * 2, "output_padding": [output_padding] * 2,
                 "groups": groups, "kernel_shape": [kernel] * 2}
        return self.op(OpKind.CONV_TRANSPOSE, [x], (batch, out_channels, *spatial), params=params, attrs=attrs, name=name)

    def linear(self, x: Value, out_features: int, *, transposed: bool = False, bias: bool = False,
               weight: Param | None = None) -> Value:
        """``x @ W^T`` over the last axis; ``transposed`` stores W as (in, out), as ONNX MatMul does."""
        shape = _require_shape(x)
        in_features = int(shape[-1])
        name = self.fresh("fc")
        if weight is None:
            stored = (in_features, out_features) if transposed else (out_features, in_features)
            weight = self.param(f"{name}.weight", stored, out_axis=int(transposed), in_axis=1 - int(transposed))
        out = weight.shape[weight.out_axis]
        params = {"weight": weight}
        if bias:
            params["bias"] = self.param(f"{name}.bias", (out,), prunable=False, data=np.zeros(out, np.float32))
        attrs = {"in_features": in_features, "out_features": out}
        return self.op(OpKind.LINEAR, [x], (*shape[:-1], out), params=params, attrs=attrs, name=name)

    # ---- activations, norms, joins ------------------------------------------------------------
    def pointwise(self, x: Value, op: str) -> Value:
        return self.op(OpKind.POINTWISE, [x], x.shape, role=op, attrs={"op": op})

    def relu(self, x: Value) -> Value:
        return self.pointwise(x, "relu")

    def batch_norm(self, x: Value, epsilon: float = 1e-5) -> Value:
        """Inference batch norm with identity statistics (scale 1, bias 0, mean 0, var 1)."""
        channels = int(_require_shape(x)[1])
        name = self.fresh("bn")
        stats = {"scale": 1.0, "bias": 0.0, "mean": 0.0, "var": 1.0}
        params = {key: self.param(f"{name}.{key}", (channels,), prunable=False, data=np.full(channels, fill, np.float32))
                  for key, fill in stats.items()}
        return self.op(OpKind.NORM, [x], x.shape, params=params, attrs={"type": "batch", "epsilon": epsilon}, name=name)

    def add(self, *xs: Value) -> Value:
        return self.op(OpKind.ADD, xs, xs[0].shape, attrs={"op": "add"})

    def mul(self, a: Value, b: Value) -> Value:
        return self.op(OpKind.MUL, [a, b], a.shape, attrs={"op": "mul"})

    def concat(self, *xs: Value, axis: int = 1) -> Value:
        shape = list(_require_shape(xs[0]))
        shape[axis] = sum(_require_shape(x)[axis] for x in xs)
        return self.op(OpKind.CONCAT, xs, tuple(shape), attrs={"axis": axis})

    def matmul(self, a: Value, b: Value) -> Value:
        """Two activations multiplied (attention scores, scores times values)."""
        return self.op(OpKind.MATMUL, [a, b], (*_require_shape(a)[:-1], _require_shape(b)[-1]))

    def softmax(self, x: Value, axis: int = -1) -> Value:
        return self.op(OpKind.SOFTMAX, [x], x.shape, attrs={"axis": axis, "log": False})

    # ---- pooling and data movement ------------------------------------------------------------
    def pool(self, x: Value, mode: str, kernel: int, stride: int) -> Value:
        """A windowed max/avg pool without padding."""
        batch, channels, height, width = _require_shape(x, 4)
        spatial = [(int(s) - kernel) // stride + 1 for s in (height, width)]
        attrs = {"mode": mode, "reduce": False, "kernel_shape": [kernel] * 2, "strides": [stride] * 2, "pads": [0] * 4,
                 "dilations": [1, 1], "ceil_mode": False, "count_include_pad": False}
        return self.op(OpKind.POOL, [x], (batch, channels, *spatial), attrs=attrs)

    def global_pool(self, x: Value) -> Value:
        """Global average pool over H, W (keepdims)."""
        batch, channels = _require_shape(x, 4)[:2]
        attrs = {"mode": "avg", "reduce": True, "axes": [2, 3], "keepdims": True}
        return self.op(OpKind.POOL, [x], (batch, channels, 1, 1), role="gap", attrs=attrs)

    def flatten(self, x: Value) -> Value:
        """Reshape to (batch, everything else)."""
        shape = _require_shape(x)
        flat = (shape[0], math.prod(int(d) for d in shape[1:]))
        return self.op(OpKind.RESHAPE, [x], flat, role="flatten", attrs={"op": "reshape", "shape": list(flat)})

    def transpose(self, x: Value, perm: Sequence[int]) -> Value:
        shape = _require_shape(x)
        return self.op(OpKind.RESHAPE, [x], tuple(shape[p] for p in perm), role="transpose", attrs={"op": "transpose", "perm": list(perm)})

    def opaque(self, inputs: Sequence[Value], shape: tuple[Dim, ...] | None, op_type: str) -> Value:
        """An operator the analyses do not understand (the escape hatch)."""
        return self.op(OpKind.OPAQUE, inputs, shape, attrs={"op_type": op_type})

    # ---- finishing ----------------------------------------------------------------------------
    def output(self, value: Value, name: str = "out") -> None:
        self.graph.add_node(OpKind.OUTPUT, self.graph.fresh_name(name), [value])

    def build(self, *outputs: Value) -> Graph:
        """Mark ``outputs`` as graph outputs, verify, and return the graph (version 0)."""
        for value in outputs:
            self.output(value)
        self.graph.verify()
        self.graph.version = 0
        return self.graph


def _require_shape(x: Value, rank: int | None = None) -> tuple[Dim, ...]:
    if x.shape is None or (rank is not None and len(x.shape) != rank):
        raise ValueError(f"%{x.name}: needs a known shape" + (f" of rank {rank}" if rank else "") + f", has {x.shape}")
    return x.shape
