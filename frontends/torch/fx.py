"""torch.fx frontend: an ``nn.Module`` + example input -> paic IR (same IR as the ONNX frontend).

``torch.fx.symbolic_trace`` gives the call graph; ``ShapeProp`` runs it twice, at the example
batch ``b`` and at ``b + 1``, and every dimension is fitted as ``a*batch + c`` (``batch`` =
``sympy.Symbol("batch", integer=True, positive=True)``), so shapes carry the symbolic batch
exactly as an ONNX model with a dynamic batch does. Known leaf modules (Conv, Linear, norms,
activations, pooling, Flatten, Dropout, Identity) and functions/methods (add, mul, cat,
reshape, permute, getitem, ...) lower through ``TorchLowering``, the builder that
``torch_export`` shares; ``nn.MultiheadAttention`` becomes one ``attention`` node whose
``in_proj_weight`` (rows = 3*dim: q, k, v) and ``out_proj.weight`` are prunable (the DPaI
reference never pruned ``in_proj``: pass ``prune_in_proj=False``); ``nn.Embedding`` and
``F.embedding`` become an embedding lookup (``TorchLowering.embedding``). Every Param keeps its
parameter FQN in ``name`` and ``origin``; ``graph.meta["torch_module"]`` holds the module
(a ``ModuleHandle``, shared by ``Graph.clone`` and never serialised) for the torch backend.
Unknown operations become ``opaque`` nodes with a warning.
"""
from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sympy
import torch
from torch import nn

from pai_compiler.errors import ModelError
from pai_compiler.frontends.params import layout_twin
from pai_compiler.ir import Dim, Graph, OpKind, Param, Value

__all__ = ["lower_fx", "TorchLowering", "TorchConst", "ModuleHandle", "BATCH", "example_inputs"]

BATCH = sympy.Symbol("batch", integer=True, positive=True)


class ModuleHandle:
    """The source ``nn.Module`` of a lowered graph: shared (not copied) by ``Graph.clone``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __deepcopy__(self, memo: dict[int, Any]) -> ModuleHandle:
        return self

    def __reduce__(self) -> Any:  # the module is a live object, never part of a saved graph
        raise TypeError("ModuleHandle is not serialisable")

    def __repr__(self) -> str:
        return f"ModuleHandle({type(self.module).__name__})"


@dataclass
class TorchConst:
    """A compile-time tensor operand: a parameter/buffer (``fqn``) or a literal (``fqn=None``).

    ``perm`` maps the operand's axes to the stored tensor's axes (after ``t()``/``permute``);
    ``broadcast_to`` is the symbolic shape after an ``expand`` (class tokens).
    """

    tensor: torch.Tensor
    fqn: str | None = None
    perm: tuple[int, ...] | None = None
    broadcast_to: tuple[Dim, ...] | None = None

    @property
    def value(self) -> torch.Tensor:
        t = self.tensor if self.perm is None else self.tensor.permute(self.perm)
        return t


class AttentionWeights:
    """Marker for ``nn.MultiheadAttention``'s second output, which paic does not model."""

    def __init__(self, label: str) -> None:
        self.label = label


def example_inputs(example: Any) -> tuple[torch.Tensor, ...]:
    """Normalise an example input (a tensor, a tuple of tensors, or a shape) to a tuple."""
    if isinstance(example, torch.Tensor):
        return (example,)
    if isinstance(example, (tuple, list)) and example and all(isinstance(d, int) for d in example):
        return (torch.randn(tuple(example), generator=torch.Generator().manual_seed(0)),)
    if isinstance(example, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example):
        return tuple(example)
    raise ModelError(f"example input must be a tensor, a tuple of tensors or a shape, got {type(example).__name__}")


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy().copy()


def _dtype(t: Any) -> str:
    return str(getattr(t, "dtype", torch.float32)).removeprefix("torch.")


def _ints(value: Any, n: int) -> list[int]:
    if isinstance(value, (int, np.integer)):
        return [int(value)] * n
    out = [int(v) for v in value]
    return out * n if len(out) == 1 and n > 1 else out


class TorchLowering:
    """IR builder shared by the fx and torch.export frontends (one method per op family)."""

    def __init__(self, module: nn.Module, name: str, frontend: str, *, prune_in_proj: bool = True) -> None:
        self.module = module
        self.graph = Graph(name)
        self.frontend = frontend
        self.prune_in_proj = prune_in_proj
        self.params: dict[str, Param] = {}
        self.twins: dict[str, Param] = {}  # a weight's Params for its other layouts (see _params)
        self.warnings: list[str] = self.graph.meta["warnings"]
        self._canonical: dict[int, str] | None = None

    def canonical_fqn(self, c: TorchConst) -> str | None:
        """The first name of ``c``'s tensor in the module: tied weights (``head.weight = emb.weight``)
        are one Param, whichever module attribute a use goes through."""
        if self._canonical is None:
            named = [*self.module.named_parameters(), *self.module.named_buffers()]
            self._canonical = {}
            for name, t in named:
                self._canonical.setdefault(id(t), name)
        return self._canonical.get(id(c.tensor), c.fqn) if c.fqn is not None else None

    # ---- values and params -------------------------------------------------------------
    def emit(self, kind: OpKind, label: str, inputs: Sequence[Value], shapes: Sequence[tuple[Dim, ...] | None], *,
             params: dict[str, Param] | None = None, attrs: dict[str, Any] | None = None, origin: str = "",
             dtype: str | None = None) -> list[Value]:
        dtype = dtype or (inputs[0].dtype if inputs else "float32")
        outs = [(self.graph.fresh_name(label if len(shapes) == 1 else f"{label}_{i}"), s, dtype) for i, s in enumerate(shapes)]
        node = self.graph.add_node(kind, self.graph.fresh_name(label), list(inputs), outs, params=params, attrs=attrs, origin=origin)
        return list(node.outputs)

    def add_input(self, name: str, shape: tuple[Dim, ...], dtype: str) -> Value:
        return self.emit(OpKind.INPUT, name, [], [shape], dtype=dtype, origin=name)[0]

    def add_output(self, x: Any, index: int) -> None:
        v = self.value(x, f"output_{index}")
        self.graph.add_node(OpKind.OUTPUT, self.graph.fresh_name(f"output_{index}"), [v], origin=f"output_{index}")

    def param(self, c: TorchConst, key: str, *, prunable: bool, out_axis: int = 0, in_axis: int | None = 1) -> Param:
        """A Param for a constant operand; a parameter/buffer maps back to its FQN."""
        perm = c.perm or tuple(range(c.tensor.dim()))
        if c.fqn is None or (not prunable and perm != tuple(range(c.tensor.dim()))):
            return Param(self.graph.fresh_name(key), _numpy(c.value), prunable=False, out_axis=0, in_axis=None)
        stored_out, stored_in = (perm[out_axis], perm[in_axis] if in_axis is not None else None) if prunable else (0, None)
        fqn = self.canonical_fqn(c) or c.fqn
        existing = self.params.get(fqn)
        if existing is not None:
            return layout_twin(existing, stored_out, stored_in, self.twins, self.warnings) if prunable else existing
        p = Param(fqn, _numpy(c.tensor), prunable=prunable, out_axis=stored_out, in_axis=stored_in, origin=fqn)
        self.params[fqn] = p
        return p

    def const(self, x: Any, like: Value | None = None) -> TorchConst:
        if isinstance(x, TorchConst):
            return x
        dtype = torch.float32 if like is None or like.dtype.startswith("float") else getattr(torch, like.dtype)
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise ModelError(f"cannot use {type(x).__name__} {x!r} as a tensor operand")
        return TorchConst(torch.tensor(x, dtype=dtype))

    def value(self, x: Any, hint: str) -> Value:
        """A Value for an operand; constants become ``constant`` nodes (as in the ONNX frontend)."""
        if isinstance(x, Value):
            return x
        if isinstance(x, AttentionWeights):
            raise ModelError(f"{x.label}: the attention-weights output of nn.MultiheadAttention is not supported (call it with need_weights=False or ignore output 1)")
        c = self.const(x)
        shape = c.broadcast_to or tuple(int(d) for d in c.value.shape)
        p = self.param(c, f"{hint}_const", prunable=False)
        return self.emit(OpKind.CONSTANT, f"{hint}_const", [], [shape], params={"value": p},
                         attrs={"broadcast": c.broadcast_to is not None}, dtype=_dtype(c.tensor))[0]

    # ---- weighted layers ---------------------------------------------------------------
    def conv(self, label: str, x: Value, w: TorchConst, b: TorchConst | None, stride: Any, padding: Any, dilation: Any,
             groups: int, shape: tuple[Dim, ...], origin: str) -> Value:
        kernel = [int(d) for d in w.value.shape[2:]]
        n = len(kernel)
        strides, dil = _ints(stride, n), _ints(dilation, n)
        if isinstance(padding, str):
            if padding == "valid":
                pads = [0] * 2 * n
            else:  # 'same' (stride 1): the extra pad goes to the end, as torch does
                total = [d * (k - 1) for d, k in zip(dil, kernel)]
                pads = [t // 2 for t in total] + [t - t // 2 for t in total]
        else:
            p = _ints(padding, n)
            pads = p + p
        params = {"weight": self.param(w, f"{label}_weight", prunable=True, out_axis=0, in_axis=1)}
        if b is not None:
            params["bias"] = self.param(b, f"{label}_bias", prunable=False, out_axis=0, in_axis=None)
        attrs = {"strides": strides, "pads": pads, "dilations": dil, "groups": int(groups), "kernel_shape": kernel}
        return self.emit(OpKind.CONV, label, [x], [shape], params=params, attrs=attrs, origin=origin)[0]

    def linear(self, label: str, x: Value, w: TorchConst, b: TorchConst | None, shape: tuple[Dim, ...], origin: str,
               *, transposed: bool = False) -> Value:
        """``y = x @ W^T + b`` with W (out, in); ``transposed`` when the operand is (in, out) (``x @ W``)."""
        out_axis, in_axis = (1, 0) if transposed else (0, 1)
        prunable = True
        if not self.prune_in_proj and w.fqn is not None and w.fqn.rsplit(".", 1)[-1] in _IN_PROJ and self._is_mha_param(w.fqn):
            prunable = False
        params = {"weight": self.param(w, f"{label}_weight", prunable=prunable, out_axis=out_axis, in_axis=in_axis)}
        if b is not None:
            params["bias"] = self.param(b, f"{label}_bias", prunable=False, out_axis=0, in_axis=None)
        attrs = {"in_features": int(w.value.shape[in_axis]), "out_features": int(w.value.shape[out_axis])}
        return self.emit(OpKind.LINEAR, label, [x], [shape], params=params, attrs=attrs, origin=origin)[0]

    def _is_mha_param(self, fqn: str) -> bool:
        owner = fqn.rsplit(".", 1)[0] if "." in fqn else ""
        try:
            return isinstance(self.module.get_submodule(owner), nn.MultiheadAttention)
        except AttributeError:
            return False

    def attention(self, label: str, mha: nn.MultiheadAttention, fqn: str, q: Value, k: Value, v: Value,
                  shape: tuple[Dim, ...], origin: str) -> Value:
        """One ``attention`` node for an ``nn.MultiheadAttention`` (eval semantics, no masks)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ModelError(f"{fqn}: nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
        inputs: list[Value] = []
        for t in (q, k, v):
            if t not in inputs:
                inputs.append(t)
        prefix = f"{fqn}." if fqn else ""
        params: dict[str, Param] = {}
        names = ["in_proj_weight"] if mha._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        for key in names:
            c = TorchConst(getattr(mha, key), prefix + key)
            params[key] = self.param(c, key, prunable=self.prune_in_proj, out_axis=0, in_axis=1)
        if mha.in_proj_bias is not None:
            params["in_proj_bias"] = self.param(TorchConst(mha.in_proj_bias, prefix + "in_proj_bias"), "in_proj_bias", prunable=False, in_axis=None)
        params["out_proj_weight"] = self.param(TorchConst(mha.out_proj.weight, prefix + "out_proj.weight"), "out_proj_weight", prunable=True)
        if mha.out_proj.bias is not None:
            params["out_proj_bias"] = self.param(TorchConst(mha.out_proj.bias, prefix + "out_proj.bias"), "out_proj_bias", prunable=False, in_axis=None)
        attrs = {"num_heads": int(mha.num_heads), "embed_dim": int(mha.embed_dim), "head_dim": int(mha.head_dim),
                 "batch_first": bool(mha.batch_first), "qkv": [inputs.index(t) for t in (q, k, v)]}
        return self.emit(OpKind.ATTENTION, label, inputs, [shape], params=params, attrs=attrs, origin=origin)[0]

    def norm(self, label: str, x: Value, typ: str, consts: dict[str, TorchConst | None], eps: float,
             origin: str, **extra: Any) -> Value:
        params = {k: self.param(c, f"{label}_{k}", prunable=False, out_axis=0, in_axis=None) for k, c in consts.items() if c is not None}
        attrs = {"type": typ, "epsilon": float(eps), **extra}
        return self.emit(OpKind.NORM, label, [x], [x.shape], params=params, attrs=attrs, origin=origin)[0]

    # ---- elementwise -------------------------------------------------------------------
    def pointwise(self, label: str, x: Value, op: str, origin: str, **attrs: Any) -> Value:
        return self.emit(OpKind.POINTWISE, label, [x], [x.shape], attrs={"op": op, **attrs}, origin=origin,
                         dtype=attrs.get("to") if op == "cast" else None)[0]

    def binary(self, label: str, op: str, a: Any, b: Any, shape: tuple[Dim, ...], origin: str) -> Value:
        """add/sub/mul/div/pow/max/min: one constant operand -> ``pointwise``, else ``add``/``mul``."""
        values = [t for t in (a, b) if isinstance(t, Value)]
        if len(values) == 1:
            x = values[0]
            other = b if a is x else a
            c = self.const(other, like=x)
            if c.broadcast_to is None:
                p = self.param(c, f"{op}_const", prunable=False, in_axis=None)
                return self.emit(OpKind.POINTWISE, label, [x], [shape], params={"const": p},
                                 attrs={"op": op, "const_first": a is not x}, origin=origin)[0]
        if op in ("pow", "max", "min"):
            return self.opaque(label, [a, b], [shape], origin, f"{op} of two activations")
        operands = [self.value(t, f"{label}_{i}") for i, t in enumerate((a, b))]
        kind = OpKind.ADD if op in ("add", "sub") else OpKind.MUL
        return self.emit(kind, label, operands, [shape], attrs={"op": op}, origin=origin)[0]

    def matmul(self, label: str, a: Any, b: Any, shape: tuple[Dim, ...], origin: str) -> Value:
        if isinstance(a, Value) and isinstance(b, TorchConst) and b.value.dim() == 2:
            if b.broadcast_to is None or tuple(b.broadcast_to[-2:]) == tuple(b.value.shape):
                return self.linear(label, a, TorchConst(b.tensor, b.fqn, b.perm), None, shape, origin, transposed=True)
        operands = [self.value(t, f"{label}_{i}") for i, t in enumerate((a, b))]
        return self.emit(OpKind.MATMUL, label, operands, [shape], origin=origin)[0]

    def softmax(self, label: str, x: Value, axis: int, origin: str, *, log: bool = False) -> Value:
        return self.emit(OpKind.SOFTMAX, label, [x], [x.shape], attrs={"axis": int(axis), "log": log}, origin=origin)[0]

    def sdpa(self, label: str, q: Value, k: Value, v: Value, shape: tuple[Dim, ...], origin: str, *,
             scale: float | None = None) -> Value:
        """``softmax(q k^T * scale) v`` as mul, transpose, matmul, softmax, matmul (the ONNX spelling)."""
        head = q.shape[-1] if q.shape is not None else None
        if scale is None:
            if not isinstance(head, int):
                return self.opaque(label, [q, k, v], [shape], origin, "scaled_dot_product_attention with a symbolic head size")
            scale = 1.0 / math.sqrt(head)
        qs = self.binary(f"{label}_scale", "mul", q, float(scale), q.shape, origin)
        rank = len(k.shape)
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        kt = self.transpose(f"{label}_kT", k, perm, origin)
        s_shape = (*q.shape[:-1], k.shape[-2])
        scores = self.emit(OpKind.MATMUL, f"{label}_qk", [qs, kt], [s_shape], origin=origin)[0]
        probs = self.softmax(f"{label}_softmax", scores, -1, origin)
        return self.emit(OpKind.MATMUL, f"{label}_av", [probs, v], [shape], origin=origin)[0]

    # ---- data movement -----------------------------------------------------------------
    def reshape(self, label: str, x: Value, shape: tuple[Dim, ...], origin: str) -> Value:
        if x.shape is not None and tuple(x.shape) == tuple(shape):
            return x
        return self.emit(OpKind.RESHAPE, label, [x], [shape], attrs={"op": "reshape", "shape": list(shape)}, origin=origin)[0]

    def transpose(self, label: str, x: Value, perm: Sequence[int], origin: str) -> Value:
        perm = [int(p) % len(perm) for p in perm]
        if perm == list(range(len(perm))):
            return x
        shape = tuple(x.shape[p] for p in perm)
        return self.emit(OpKind.RESHAPE, label, [x], [shape], attrs={"op": "transpose", "perm": perm}, origin=origin)[0]

    def expand(self, label: str, x: Any, shape: tuple[Dim, ...], origin: str) -> Any:
        if isinstance(x, TorchConst):
            return TorchConst(x.tensor, x.fqn, x.perm, tuple(shape))
        if tuple(x.shape) == tuple(shape):
            return x
        return self.emit(OpKind.RESHAPE, label, [x], [shape], attrs={"op": "expand"}, origin=origin)[0]

    def slice(self, label: str, x: Value, axis: int, start: int | None, end: int | None, step: int,
              shape: tuple[Dim, ...], origin: str) -> Value:
        axis %= len(x.shape)
        size = x.shape[axis]
        start = 0 if start is None else int(start)
        end = 2**63 - 1 if end is None else int(end)
        if start == 0 and step == 1 and (end >= 2**62 or (isinstance(size, int) and end >= size)):
            return x
        attrs = {"op": "slice", "starts": [start], "ends": [end], "axes": [axis], "steps": [int(step)]}
        return self.emit(OpKind.RESHAPE, label, [x], [shape], attrs=attrs, origin=origin)[0]

    def select(self, label: str, x: Value, axis: int, index: int, origin: str) -> Value:
        axis %= len(x.shape)
        shape = tuple(d for i, d in enumerate(x.shape) if i != axis)
        attrs = {"op": "gather", "axis": axis, "indices": int(index), "indices_shape": []}
        return self.emit(OpKind.RESHAPE, label, [x], [shape], attrs=attrs, origin=origin)[0]

    def pad(self, label: str, x: Value, pad: Sequence[int], shape: tuple[Dim, ...], origin: str) -> Value:
        """Zero padding; ``pad`` in torch order (last axis first, (begin, end) pairs)."""
        n = len(x.shape)
        begins, ends = [0] * n, [0] * n
        for i in range(len(pad) // 2):
            begins[n - 1 - i], ends[n - 1 - i] = int(pad[2 * i]), int(pad[2 * i + 1])
        return self.emit(OpKind.RESHAPE, label, [x], [shape], attrs={"op": "pad", "pads": begins + ends}, origin=origin)[0]

    def concat(self, label: str, items: Sequence[Any], axis: int, shape: tuple[Dim, ...], origin: str) -> Value:
        values = [self.value(t, f"{label}_{i}") for i, t in enumerate(items)]
        return self.emit(OpKind.CONCAT, label, values, [shape], attrs={"axis": int(axis) % len(shape)}, origin=origin)[0]

    def split(self, label: str, x: Value, sizes: Sequence[int], axis: int, shapes: Sequence[tuple[Dim, ...]], origin: str) -> list[Value]:
        axis %= len(x.shape)
        return self.emit(OpKind.SPLIT, label, [x], list(shapes), attrs={"axis": axis, "sizes": [int(s) for s in sizes]}, origin=origin)

    # ---- pooling -----------------------------------------------------------------------
    def pool(self, label: str, x: Value, mode: str, kernel: Any, stride: Any, padding: Any, dilation: Any,
             ceil_mode: bool, count_include_pad: bool, shape: tuple[Dim, ...], origin: str) -> Value:
        n = len(x.shape) - 2
        k = _ints(kernel, n)
        s = _ints(stride, n) if stride not in (None, [], ()) else list(k)
        p = _ints(padding, n)
        attrs: dict[str, Any] = {"mode": mode, "reduce": False, "kernel_shape": k, "strides": s, "pads": p + p,
                                 "dilations": _ints(dilation, n), "ceil_mode": bool(ceil_mode)}
        if mode == "avg":
            attrs["count_include_pad"] = bool(count_include_pad)
        return self.emit(OpKind.POOL, label, [x], [shape], attrs=attrs, origin=origin)[0]

    def reduce(self, label: str, x: Value, mode: str, axes: Sequence[int] | None, keepdims: bool, shape: tuple[Dim, ...], origin: str) -> Value:
        rank = len(x.shape)
        axes = sorted({int(a) % rank for a in (range(rank) if axes is None or len(axes) == 0 else axes)})
        return self.emit(OpKind.POOL, label, [x], [shape], attrs={"mode": mode, "reduce": True, "axes": axes, "keepdims": bool(keepdims)}, origin=origin)[0]

    def adaptive_pool(self, label: str, x: Value, mode: str, output_size: Any, shape: tuple[Dim, ...], origin: str) -> Value:
        n = len(x.shape) - 2
        out = [x.shape[2 + i] if o is None else int(o) for i, o in enumerate(_as_list(output_size, n))]
        spatial = list(x.shape[2:])
        if all(o == 1 for o in out):
            return self.reduce(label, x, mode, list(range(2, 2 + n)), True, shape, origin)
        if all(isinstance(d, int) and d % o == 0 for d, o in zip(spatial, out)):
            k = [d // o for d, o in zip(spatial, out)]
            return self.pool(label, x, mode, k, k, 0, 1, False, True, shape, origin)
        return self.opaque(label, [x], [shape], origin, f"adaptive {mode} pooling to {out} from {spatial}")

    def embedding(self, label: str, indices: Value, table: TorchConst, shape: tuple[Dim, ...], origin: str, op_type: str) -> Value:
        """An embedding lookup ``table[indices]`` (axis 0): an ``opaque`` node with
        ``op="embedding"`` over the indices and the dense, non-prunable ``table`` Param, the
        ONNX frontend's lowering of ``Gather(table, indices)``; its dtype is the table's."""
        p = self.param(table, f"{label}_table", prunable=False, in_axis=None)
        attrs = {"op": "embedding", "axis": 0, "op_type": op_type, "domain": f"torch.{self.frontend}"}
        return self.emit(OpKind.OPAQUE, label, [indices], [shape], params={"table": p}, attrs=attrs, origin=origin,
                         dtype=str(p.data.dtype))[0]

    def opaque(self, label: str, items: Sequence[Any], shapes: Sequence[tuple[Dim, ...] | None], origin: str, why: str,
               dtype: str | None = None) -> Any:
        """An operation paic has no rule for; ``dtype`` defaults to the first operand's."""
        values = [self.value(t, f"{label}_{i}") for i, t in enumerate(items) if isinstance(t, (Value, TorchConst))]
        self.warnings.append(f"node {label!r} ({origin}) is opaque: {why}")
        outs = self.emit(OpKind.OPAQUE, label, values, list(shapes), attrs={"op_type": origin, "domain": f"torch.{self.frontend}", "reason": why},
                         origin=origin, dtype=dtype)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def finish(self, inputs: Sequence[torch.Tensor] = ()) -> Graph:
        g = self.graph
        g.meta.update(symbols={"batch": BATCH}, source_format="torch", frontend=self.frontend,
                      input_shape=list(inputs[0].shape) if inputs else None,
                      torch_module=ModuleHandle(self.module), weight_sources={k: "torch" for k in self.params})
        g.verify()
        return g


_IN_PROJ = {"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"}


def _as_list(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


# ======================================================================================
# fx: tracing, two-batch shape propagation, and the op tables
# ======================================================================================
class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in _tables()[0] or super().is_leaf_module(m, qualname)


class _Meta:
    """Shape/dtype of one tensor result, or a plain Python value."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape: tuple[int, ...], dtype: str) -> None:
        self.shape, self.dtype = shape, dtype


def _record(gm: torch.fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    from torch.fx.passes.shape_prop import ShapeProp

    out: dict[str, Any] = {}

    class _Prop(ShapeProp):
        def run_node(self, n: torch.fx.Node) -> Any:
            result = super().run_node(n)
            out[n.name] = torch.utils._pytree.tree_map(lambda t: _Meta(tuple(t.shape), _dtype(t)) if isinstance(t, torch.Tensor) else t, result)
            return result

    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints tracebacks itself
        _Prop(gm).propagate(*inputs)
    return out


def _fit(a: Any, b: Any, b1: int, b2: int, where: str) -> Any:
    """Fit ``a`` (at batch b1) and ``b`` (at b2) as ``slope*batch + c``; recurse into containers."""
    if isinstance(a, _Meta):
        return _Meta(tuple(_fit(x, y, b1, b2, where) for x, y in zip(a.shape, b.shape)), a.dtype)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return type(a)(_fit(x, y, b1, b2, where) for x, y in zip(a, b)) if not isinstance(a, torch.Size) else tuple(_fit(x, y, b1, b2, where) for x, y in zip(a, b))
    if isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool):
        if a == b:
            return a
        slope, rem = divmod(b - a, b2 - b1)
        if rem or slope < 0:
            raise ModelError(f"{where}: a size is not an increasing linear function of the batch ({a} at batch {b1}, {b} at batch {b2})")
        return sympy.expand(slope * BATCH + (a - slope * b1))
    return a


def lower_fx(module: nn.Module, example: Any, *, name: str | None = None, prune_in_proj: bool = True) -> Graph:
    """Trace ``module`` with torch.fx and lower it; ``example`` is a tensor, tuple or shape.

    Dim 0 of every input is the batch (symbolic in the IR); the module is evaluated in eval
    mode and its training flag restored.
    """
    inputs = example_inputs(example)
    b1 = int(inputs[0].shape[0]) if inputs[0].dim() else 1
    inputs2 = tuple(torch.cat([t, t[:1]], 0) if t.dim() else t for t in inputs)
    was_training = module.training
    module.eval()
    try:
        try:
            graph = _Tracer().trace(module)
        except Exception as exc:
            msg = " ".join(str(exc).split())[:300]
            raise ModelError(f"torch.fx cannot trace {type(module).__name__}: {type(exc).__name__}: {msg} (try --frontend export)") from None
        gm = torch.fx.GraphModule(module, graph)
        try:
            run1, run2 = _record(gm, inputs), _record(gm, inputs2)
        except Exception as exc:
            msg = " ".join(str(exc).split())[:300]
            raise ModelError(f"{type(module).__name__} fails on the example input: {type(exc).__name__}: {msg}") from None
        metas = {k: _fit(run1[k], run2[k], b1, b1 + 1, k) for k in run1}
        lowering = TorchLowering(module, name or type(module).__name__, "fx", prune_in_proj=prune_in_proj)
        _FxWalker(lowering, gm, metas).run()
        return lowering.finish(inputs)
    finally:
        module.train(was_training)


class _FxWalker:
    def __init__(self, lw: TorchLowering, gm: torch.fx.GraphModule, metas: dict[str, Any]) -> None:
        self.lw, self.gm, self.metas = lw, gm, metas
        self.env: dict[str, Any] = {}

    def shape(self, n: torch.fx.Node) -> tuple[Dim, ...]:
        m = self.metas.get(n.name)
        if not isinstance(m, _Meta):
            raise ModelError(f"{n.name}: expected a tensor result")
        return m.shape

    def load(self, a: Any) -> Any:
        return torch.fx.node.map_arg(a, lambda n: self.env[n.name])

    def run(self) -> None:
        outputs = 0
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                m = self.metas.get(n.name)
                if not isinstance(m, _Meta):
                    raise ModelError(f"input {n.name!r}: only tensor inputs are supported")
                self.env[n.name] = self.lw.add_input(n.name, m.shape, m.dtype)
            elif n.op == "get_attr":
                t = _get_attr(self.gm, n.target)
                self.env[n.name] = TorchConst(t, n.target) if isinstance(t, torch.Tensor) else t
            elif n.op == "output":
                for leaf in torch.utils._pytree.tree_leaves(self.load(n.args[0])):
                    self.lw.add_output(leaf, outputs)
                    outputs += 1
            else:
                self.env[n.name] = self.visit(n)

    def visit(self, n: torch.fx.Node) -> Any:
        args, kwargs = self.load(n.args), self.load(n.kwargs)
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        module_rules, function_rules = _tables()
        if not any(isinstance(a, Value) for a in leaves):
            return self.static(n, args, kwargs)
        if n.op == "call_module":
            mod = self.gm.get_submodule(n.target)
            rule = module_rules.get(type(mod))
            if rule is None:
                return self.lw.opaque(n.name, [a for a in leaves if isinstance(a, Value)], self._shapes(n), type(mod).__name__,
                                      f"module {type(mod).__name__} has no paic rule", dtype=self._dtype(n))
            return rule(self, n, mod, *args, **kwargs)
        key = n.target if n.op == "call_function" else f"Tensor.{n.target}"
        rule = function_rules.get(key)
        if rule is None:
            label = getattr(n.target, "__name__", str(n.target))
            return self.lw.opaque(n.name, [a for a in leaves if isinstance(a, (Value, TorchConst))], self._shapes(n), label,
                                  f"{label} has no paic rule", dtype=self._dtype(n))
        return rule(self, n, *args, **kwargs)

    def _shapes(self, n: torch.fx.Node) -> list[tuple[Dim, ...]]:
        m = self.metas.get(n.name)
        return [x.shape for x in torch.utils._pytree.tree_leaves(m) if isinstance(x, _Meta)] or [None]  # type: ignore[list-item]

    def _dtype(self, n: torch.fx.Node) -> str | None:
        """The dtype of the node's first tensor result (None when it has none)."""
        metas = [x for x in torch.utils._pytree.tree_leaves(self.metas.get(n.name)) if isinstance(x, _Meta)]
        return metas[0].dtype if metas else None

    def static(self, n: torch.fx.Node, args: Any, kwargs: Any) -> Any:
        """Evaluate a node whose operands are all compile-time (params, Python values)."""
        if n.op == "call_method" and n.target in ("t", "permute", "transpose") and isinstance(args[0], TorchConst) and args[0].broadcast_to is None:
            c = args[0]
            rank = c.value.dim()
            perm = _perm_of(n.target, rank, args[1:])
            base = c.perm or tuple(range(rank))
            return TorchConst(c.tensor, c.fqn, tuple(base[p] for p in perm))
        if n.op == "call_method" and n.target == "expand" and isinstance(args[0], TorchConst):
            return self.lw.expand(n.name, args[0], self.shape(n), n.name)
        if n.op == "call_function" and n.target is getattr:
            if isinstance(args[0], TorchConst) and args[1] in ("T", "mT"):  # a transposed weight view
                c = args[0]
                rank = c.value.dim()
                perm = tuple(reversed(range(rank))) if args[1] == "T" else (*range(rank - 2), rank - 1, rank - 2)
                base = c.perm or tuple(range(rank))
                return TorchConst(c.tensor, c.fqn, tuple(base[p] for p in perm))
            return getattr(args[0], args[1])
        plain = torch.utils._pytree.tree_map(lambda a: a.value if isinstance(a, TorchConst) else a, (args, kwargs))
        if any(isinstance(a, sympy.Basic) for a in torch.utils._pytree.tree_leaves(plain)) and n.op != "call_function":
            raise ModelError(f"{n.name}: a batch-dependent size is used on a constant ({n.target})")
        if any(isinstance(a, TorchConst) and a.broadcast_to is not None for a in torch.utils._pytree.tree_leaves((args, kwargs))):
            raise ModelError(f"{n.name}: an expanded constant is used by {n.target}")
        try:
            if n.op == "call_function":
                result = n.target(*plain[0], **plain[1])
            elif n.op == "call_method":
                result = getattr(plain[0][0], n.target)(*plain[0][1:], **plain[1])
            else:
                result = self.gm.get_submodule(n.target)(*plain[0], **plain[1])
        except Exception as exc:
            raise ModelError(f"{n.name}: cannot evaluate {n.target} on constants ({type(exc).__name__}: {exc})") from None
        return TorchConst(result.detach()) if isinstance(result, torch.Tensor) else result


def _get_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _perm_of(kind: str, rank: int, rest: Sequence[Any]) -> list[int]:
    if kind == "t" or (kind == "T"):
        return list(reversed(range(rank)))
    if kind == "transpose":
        a, b = int(rest[0]) % rank, int(rest[1]) % rank
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    return [int(d) % rank for d in dims]


def _tables() -> tuple[dict[Any, Callable[..., Any]], dict[Any, Callable[..., Any]]]:
    """(module rules, function rules) from ``_torch_ops``, imported on first use."""
    from pai_compiler.frontends.torch.ops import FUNCTION_RULES, MODULE_RULES

    return MODULE_RULES, FUNCTION_RULES
