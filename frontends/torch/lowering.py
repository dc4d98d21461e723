"""The IR builder the fx and torch.export frontends share: one method per op family, torch operands -> IR nodes.

Every Param keeps its parameter FQN in ``name`` and ``origin`` (tied weights map to their first
name in the module); ``finish`` stores the module as a ``ModuleHandle`` in ``graph.meta``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pai_compiler.errors import ModelError
from pai_compiler.frontends.params import layout_twin
from pai_compiler.frontends.torch.operands import BATCH, AttentionWeights, ModuleHandle, TorchConst, dtype_name
from pai_compiler.ir import Dim, Graph, OpKind, Param, Value
from pai_compiler.passes.transform.patterns import fuse_activations, fuse_layer_norms

__all__ = ["TorchLowering"]


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy().copy()


def _ints(value: Any, n: int) -> list[int]:
    if isinstance(value, (int, np.integer)):
        return [int(value)] * n
    out = [int(v) for v in value]
    return out * n if len(out) == 1 and n > 1 else out


class TorchLowering:
    """IR builder shared by the fx and torch.export frontends (one method per op family)."""

    def __init__(self, module: nn.Module, name: str, frontend: str, *, prune_in_proj: bool = True, prune_tied: bool = False) -> None:
        self.module = module
        self.graph = Graph(name)
        self.frontend = frontend
        self.prune_in_proj = prune_in_proj
        self.prune_tied = prune_tied
        self.tables: dict[str, Param] = {}  # weights read as embedding tables, by canonical FQN
        self.params: dict[str, Param] = {}
        self.twins: dict[str, Param] = {}  # a weight's Params for its other layouts (see _params)
        self.warnings: list[str] = self.graph.meta["warnings"]
        self._canonical: dict[int, str] | None = None
        self._aliases: dict[str, str] = {}

    def canonical_fqn(self, c: TorchConst) -> str | None:
        """The first name of ``c``'s tensor in the module: tied weights (``head.weight = emb.weight``)
        are one Param, whichever module attribute a use goes through."""
        if self._canonical is None:
            self._canonical, self._aliases = {}, {}
            named = [*self.module.named_parameters(remove_duplicate=False), *self.module.named_buffers(remove_duplicate=False)]
            for name, t in named:
                self._aliases[name] = self._canonical.setdefault(id(t), name)
        if c.fqn is None:
            return None
        # by identity first; a detached copy (torch.export's lifted parameters) by its name
        return self._canonical.get(id(c.tensor)) or self._aliases.get(c.fqn, c.fqn)

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
        if c.varies_at_batch is not None:
            raise ModelError(f"{key}: a constant that differs per sample (e.g. arange over the batch, evaluated at batch "
                             f"{c.varies_at_batch}) feeds the model's computation; paic cannot express it as a weight or constant")
        perm = c.perm or tuple(range(c.tensor.dim()))
        if c.fqn is None or (not prunable and perm != tuple(range(c.tensor.dim()))):
            return Param(self.graph.fresh_name(key), _numpy(c.value), prunable=False, out_axis=0, in_axis=None)
        stored_out, stored_in = (perm[out_axis], perm[in_axis] if in_axis is not None else None) if prunable else (0, None)
        fqn = self.canonical_fqn(c) or c.fqn
        existing = self.params.get(fqn)
        if prunable and fqn in self.tables:
            return self._tied_weight(fqn, c, stored_out, stored_in, key)
        if existing is not None:
            return layout_twin(existing, stored_out, stored_in, self.twins, self.warnings) if prunable else existing
        p = Param(fqn, _numpy(c.tensor), prunable=prunable, out_axis=stored_out, in_axis=stored_in, origin=fqn)
        self.params[fqn] = p
        return p

    def table_param(self, c: TorchConst, key: str) -> Param:
        """The dense Param of an embedding table; a table tied to a prunable weight follows the tie decision."""
        fqn = self.canonical_fqn(c) or c.fqn
        if c.fqn is None or c.perm is not None or fqn is None:
            return self.param(c, key, prunable=False, in_axis=None)
        if fqn in self.tables:
            return self.tables[fqn]
        existing = self.params.get(fqn)
        if existing is not None and existing.prunable:  # a weight layer read it first
            self._tie_warning(fqn)
            if not self.prune_tied:
                existing.prunable = False
            table = Param(f"{fqn}.table", existing.data, prunable=False, out_axis=0, in_axis=None, origin=fqn)
        else:
            table = existing or Param(fqn, _numpy(c.tensor), prunable=False, out_axis=0, in_axis=None, origin=fqn)
            self.params.setdefault(fqn, table)
        self.tables[fqn] = table
        return table

    def _tied_weight(self, fqn: str, c: TorchConst, out_axis: int, in_axis: int | None, key: str) -> Param:
        """A weight layer reading an embedding table (a tied LM head): dense unless ``prune_tied``."""
        self._tie_warning(fqn)
        twin_key = f"{fqn}@weight{out_axis},{in_axis}"
        if twin_key not in self.twins:
            self.twins[twin_key] = Param(f"{fqn}.weight{len(self.twins) + 1}", self.tables[fqn].data, prunable=self.prune_tied,
                                         out_axis=out_axis, in_axis=in_axis, origin=fqn)
        return self.twins[twin_key]

    def _tie_warning(self, fqn: str) -> None:
        target = dict(self.module.named_parameters()).get(fqn)
        names = [n for n, t in self.module.named_parameters(remove_duplicate=False) if t is target] if target is not None else [fqn]
        pair = " = ".join(dict.fromkeys(names))
        if self.prune_tied:
            message = f"tied weights {pair}: an embedding table read by a weight layer; pruned as that layer's weight (prune_tied), which zeroes the same entries of the embedding"
        else:
            message = f"tied weights {pair}: an embedding table read by a weight layer; kept dense (prune it with --prune-tied / prune_tied=True)"
        if message not in self.warnings:
            self.warnings.append(message)

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
                         attrs={"broadcast": c.broadcast_to is not None}, dtype=dtype_name(c.tensor))[0]

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

    def conv_transpose(self, label: str, x: Value, w: TorchConst, b: TorchConst | None, stride: Any, padding: Any, output_padding: Any,
                       dilation: Any, groups: int, shape: tuple[Dim, ...], origin: str) -> Value:
        """A transposed conv, weight (in, out/groups, k...); ``output_padding`` is read off the traced
        output size where it is static (so a module called with ``output_size`` lowers exactly)."""
        kernel = [int(d) for d in w.value.shape[2:]]
        n = len(kernel)
        strides, dil, pad = _ints(stride, n), _ints(dilation, n), _ints(padding, n)
        extra = _ints(output_padding, n)
        if x.shape is not None:
            for i in range(n):
                size, out = x.shape[2 + i], shape[2 + i]
                if isinstance(size, int) and isinstance(out, int):
                    extra[i] = out - ((size - 1) * strides[i] - 2 * pad[i] + dil[i] * (kernel[i] - 1) + 1)
        params = {"weight": self.param(w, f"{label}_weight", prunable=True, out_axis=1, in_axis=0)}
        if b is not None:
            params["bias"] = self.param(b, f"{label}_bias", prunable=False, out_axis=0, in_axis=None)
        attrs = {"strides": strides, "pads": pad + pad, "dilations": dil, "output_padding": extra, "groups": int(groups), "kernel_shape": kernel}
        return self.emit(OpKind.CONV_TRANSPOSE, label, [x], [shape], params=params, attrs=attrs, origin=origin)[0]

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

    def baddbmm(self, label: str, bias: Any, batch1: Any, batch2: Any, shape: tuple[Dim, ...], origin: str, *,
                alpha: float = 1, beta: float = 1) -> Value:
        """``beta*bias + alpha*(batch1 @ batch2)`` (BLOOM's ALiBi attention scores): matmul, scale, add."""
        scores = self.matmul(f"{label}_bmm", batch1, batch2, shape, origin)
        if alpha != 1:
            scores = self.binary(f"{label}_alpha", "mul", scores, float(alpha), shape, origin)
        if beta == 0 or bias is None:
            return scores
        if beta != 1:
            bias = (self.binary(f"{label}_beta", "mul", bias, float(beta), bias.shape, origin) if isinstance(bias, Value)
                    else TorchConst(self.const(bias).value * beta))
        return self.binary(label, "add", bias, scores, shape, origin)

    def softmax(self, label: str, x: Value, axis: int, origin: str, *, log: bool = False) -> Value:
        return self.emit(OpKind.SOFTMAX, label, [x], [x.shape], attrs={"axis": int(axis), "log": log}, origin=origin)[0]

    def sdpa(self, label: str, q: Value, k: Value, v: Value, shape: tuple[Dim, ...], origin: str, *,
             scale: float | None = None, mask: Any = None, causal: bool = False) -> Value:
        """``softmax(q k^T * scale + mask) v`` as mul, transpose, matmul, (add,) softmax, matmul (the ONNX spelling).

        A boolean ``mask`` (True = attend) adds ``0``/``-max`` and a float one is added as is;
        ``causal`` adds the lower-triangular mask; an all-attend constant mask is dropped.
        """
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
        if causal:
            rows, cols = s_shape[-2], s_shape[-1]
            if not isinstance(rows, int) or not isinstance(cols, int):
                return self.opaque(label, [q, k, v], [shape], origin, "causal attention over a batch-sized sequence")
            mask = torch.ones(rows, cols, dtype=torch.bool).tril() if mask is None else None
            if mask is None:
                return self.opaque(label, [q, k, v], [shape], origin, "causal attention with an explicit mask")
            mask = TorchConst(mask)
        if mask is not None:
            scores = self._attention_mask(label, scores, mask, origin)
        probs = self.softmax(f"{label}_softmax", scores, -1, origin)
        return self.emit(OpKind.MATMUL, f"{label}_av", [probs, v], [shape], origin=origin)[0]

    def _attention_mask(self, label: str, scores: Value, mask: Any, origin: str) -> Value:
        """``scores + mask`` with a boolean mask turned additive (``0`` where True, ``-max`` where False)."""
        lowest = float(torch.finfo(torch.float32).min)
        if isinstance(mask, TorchConst):
            t = mask.value
            additive = torch.where(t, 0.0, lowest) if t.dtype == torch.bool else t.float()
            if not bool((additive != 0).any()):
                return scores  # every key attended: the mask changes nothing
            return self.binary(f"{label}_mask", "add", scores, TorchConst(additive), scores.shape, origin)
        if not isinstance(mask, Value):
            raise ModelError(f"{label}: attention mask of type {type(mask).__name__} is not supported")
        if mask.dtype == "bool":  # True * max - max = 0, False * max - max = -max (bool * float is float)
            highest = TorchConst(torch.tensor(-lowest, dtype=torch.float32))
            scale = self.param(highest, f"{label}_mask_scale", prunable=False, in_axis=None)
            scaled = self.emit(OpKind.POINTWISE, f"{label}_mask_scaled", [mask], [mask.shape], params={"const": scale},
                               attrs={"op": "mul", "const_first": False}, origin=origin, dtype="float32")[0]
            mask = self.binary(f"{label}_mask_bias", "sub", scaled, highest, mask.shape, origin)
        return self.binary(f"{label}_mask", "add", scores, mask, scores.shape, origin)

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

    def gather(self, label: str, x: Value, axis: int, indices: torch.Tensor, shape: tuple[Dim, ...], origin: str) -> Value:
        """``x`` indexed along ``axis`` by constant ``indices`` (ONNX ``Gather``: the indices' axes replace ``axis``)."""
        attrs = {"op": "gather", "axis": int(axis) % len(x.shape), "indices": indices.reshape(-1).tolist(), "indices_shape": list(indices.shape)}
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

    def pixel_shuffle(self, label: str, x: Value, factor: int, inverse: bool, origin: str) -> Value:
        """``pixel_shuffle`` (``inverse``: ``pixel_unshuffle``) by ``factor`` r on (N, C, H, W) as
        reshape -> permute -> reshape: (N, C/r², r, r, H, W) -> (0, 1, 4, 2, 5, 3) -> (N, C/r², H r, W r),
        and back for the inverse: (N, C, H/r, r, W/r, r) -> (0, 1, 3, 5, 2, 4) -> (N, C r², H/r, W/r)."""
        n, c, h, w = x.shape
        r = int(factor)
        if inverse:
            split, perm, out = (n, c, h // r, r, w // r, r), [0, 1, 3, 5, 2, 4], (n, c * r * r, h // r, w // r)
        else:
            split, perm, out = (n, c // (r * r), r, r, h, w), [0, 1, 4, 2, 5, 3], (n, c // (r * r), h * r, w * r)
        y = self.transpose(f"{label}_permute", self.reshape(f"{label}_split", x, split, origin), perm, origin)
        return self.reshape(label, y, out, origin)

    def roll(self, label: str, x: Any, shifts: Any, dims: Any, origin: str) -> Any:
        """``torch.roll`` along ``dims`` (Swin's shifted windows): per axis, the last ``shift`` entries
        moved to the front, i.e. concat(x[size - shift:], x[:size - shift]); a constant rolls at compile
        time; an opaque node where a rolled axis has a symbolic size or ``dims`` is not given (a roll of
        the flattened tensor)."""
        shift_list = [shifts] if isinstance(shifts, int) else list(shifts)
        dim_list = [] if dims is None else [dims] if isinstance(dims, int) else list(dims)
        if isinstance(x, TorchConst) and x.broadcast_to is None and x.varies_at_batch is None:
            return TorchConst(torch.roll(x.value, shift_list, dim_list or None))
        x = self.value(x, label)
        sizes = [x.shape[int(d) % len(x.shape)] for d in dim_list]
        if not dim_list or len(shift_list) != len(dim_list) or not all(isinstance(n, int) for n in sizes):
            return self.opaque(label, [x], [x.shape], origin, "roll of a flattened tensor or along a symbolic axis")
        for shift, dim, size in zip(shift_list, dim_list, sizes):
            s, axis = int(shift) % size, int(dim) % len(x.shape)
            if s:
                parts = [self.slice(f"{label}_tail", x, axis, size - s, size, 1, (*x.shape[:axis], s, *x.shape[axis + 1:]), origin),
                         self.slice(f"{label}_head", x, axis, 0, size - s, 1, (*x.shape[:axis], size - s, *x.shape[axis + 1:]), origin)]
                x = self.concat(label, parts, axis, x.shape, origin)
        return x

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

    def reduce(self, label: str, x: Value, mode: str, axes: Sequence[int] | None, keepdims: bool, shape: tuple[Dim, ...], origin: str,
               dtype: str | None = None) -> Value:
        """A reduction; ``dtype`` the result's where it differs from ``x``'s (a count of a bool mask is int64)."""
        rank = len(x.shape)
        axes = sorted({int(a) % rank for a in (range(rank) if axes is None or len(axes) == 0 else axes)})
        return self.emit(OpKind.POOL, label, [x], [shape], attrs={"mode": mode, "reduce": True, "axes": axes, "keepdims": bool(keepdims)},
                         origin=origin, dtype=dtype)[0]

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

    def resize(self, label: str, x: Value, mode: str, align_corners: Any, scales: Any, antialias: bool, shape: tuple[Dim, ...], origin: str) -> Value:
        """``F.interpolate`` / ``nn.Upsample`` / ``aten.upsample_*``: an opaque ``op="resize"`` node
        (``pai_compiler/interp_resize.py``) for nearest and (bi/tri)linear; ``scales`` are the
        kernel's scale factors (None: torch uses in/out). Torch multiplies by the inverse scale
        (``torch_coordinates``). Other modes stay opaque with the fix."""
        n = len(x.shape) - 2
        linear = mode in ("linear", "bilinear", "trilinear")
        if (mode != "nearest" and not linear) or antialias or n < 1:
            fix = ("paic evaluates nearest and (bi/tri)linear resizes only: use mode='nearest' or 'bilinear' (no antialias), "
                   "or prune with a criterion that runs no forward pass (magnitude, random, random-erk)")
            out = self.opaque(label, [x], [shape], origin, f"interpolate mode {mode!r}{' with antialias' if antialias else ''}")
            self.graph.set_attr(out.producer, "fix", fix)
            return out
        attrs: dict[str, Any] = {"op": "resize", "mode": "linear" if linear else "nearest",
                                 "coordinate_mode": ("align_corners" if align_corners else "half_pixel") if linear else "asymmetric",
                                 "nearest_mode": "floor", "scales": None if scales is None else [float(v) for v in _as_list(scales, n)],
                                 "torch_coordinates": True, "op_type": origin, "domain": f"torch.{self.frontend}"}
        return self.emit(OpKind.OPAQUE, label, [x], [shape], attrs=attrs, origin=origin)[0]

    def embedding(self, label: str, indices: Value, table: TorchConst, shape: tuple[Dim, ...], origin: str, op_type: str) -> Value:
        """An embedding lookup ``table[indices]`` (axis 0): an ``opaque`` node with
        ``op="embedding"`` over the indices and the dense, non-prunable ``table`` Param, the
        ONNX frontend's lowering of ``Gather(table, indices)``; its dtype is the table's."""
        p = self.table_param(table, f"{label}_table")
        attrs = {"op": "embedding", "axis": 0, "op_type": op_type, "domain": f"torch.{self.frontend}"}
        return self.emit(OpKind.OPAQUE, label, [indices], [shape], params={"table": p}, attrs=attrs, origin=origin,
                         dtype=str(p.data.dtype))[0]

    def index_op(self, label: str, op: str, items: Sequence[Any], shape: tuple[Dim, ...], origin: str, dtype: str, **attrs: Any) -> Value:
        """An opaque node the interpreter runs (``attrs["op"]`` in its ``OPAQUE_RULES``): index data
        such as ``compare``, ``cumsum`` or ``gather_elements`` on integer/bool tensors."""
        values = [self.value(t, f"{label}_{i}") for i, t in enumerate(items)]
        attrs = {"op": op, **attrs, "op_type": origin, "domain": f"torch.{self.frontend}"}
        return self.emit(OpKind.OPAQUE, label, values, [shape], attrs=attrs, origin=origin, dtype=dtype)[0]

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
        fuse_layer_norms(g)  # as the ONNX route does: one node per spelled-out norm and activation, the same path counts
        fuse_activations(g)
        g.verify()
        return g


_IN_PROJ = {"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"}


def _as_list(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n
