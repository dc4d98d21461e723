"""torch.fx op tables: leaf modules (``MODULE_RULES``) and functions/methods (``FUNCTION_RULES``).

Each rule gets the fx walker, the fx node and the node's operands (``Value`` for activations,
``TorchConst`` for parameters/buffers/literals, plain Python for sizes) and returns what the
node produces. Output shapes come from the two-batch shape propagation (``walker.shape(n)``),
so view/reshape/flatten need no size arithmetic. An op missing here becomes ``opaque``.
Methods are keyed ``"Tensor.<name>"``.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import sympy
import torch
import torch.nn.functional as F
from torch import nn

from pai_compiler.errors import ModelError
from pai_compiler.frontends.torch.index_ops import FX_INDEX_RULES
from pai_compiler.frontends.torch.operands import AttentionWeights, TorchConst, perm_of
from pai_compiler.ir import Value

__all__ = ["MODULE_RULES", "FUNCTION_RULES", "UNARY"]

Rule = Callable[..., Any]


def _c(t: torch.Tensor | None, fqn: str) -> TorchConst | None:
    return None if t is None else TorchConst(t, fqn)


def _kind(mod: nn.Module) -> str:
    return type(mod).__name__


# ---- leaf modules ------------------------------------------------------------------------
def _conv_module(w: Any, n: Any, mod: nn.Module, x: Value) -> Any:
    if mod.padding_mode != "zeros":
        return w.lw.opaque(n.name, [x], [w.shape(n)], _kind(mod), f"padding_mode={mod.padding_mode!r}")
    return w.lw.conv(n.name, x, TorchConst(mod.weight, f"{n.target}.weight"), _c(mod.bias, f"{n.target}.bias"),
                     mod.stride, mod.padding, mod.dilation, mod.groups, w.shape(n), n.target)


def _conv_transpose_module(w: Any, n: Any, mod: nn.Module, x: Value, output_size: Any = None) -> Any:
    """``output_size`` is already in the traced output shape, which sets ``output_padding``."""
    return w.lw.conv_transpose(n.name, x, TorchConst(mod.weight, f"{n.target}.weight"), _c(mod.bias, f"{n.target}.bias"),
                               mod.stride, mod.padding, mod.output_padding, mod.dilation, mod.groups, w.shape(n), n.target)


def _linear_module(w: Any, n: Any, mod: nn.Linear, x: Value) -> Any:
    return w.lw.linear(n.name, x, TorchConst(mod.weight, f"{n.target}.weight"), _c(mod.bias, f"{n.target}.bias"), w.shape(n), n.target)


def _embedding_module(w: Any, n: Any, mod: nn.Embedding, x: Value) -> Any:
    if mod.max_norm is not None:  # renormalises the looked-up rows of the table in place
        return w.lw.opaque(n.name, [x], [w.shape(n)], _kind(mod), "embedding with max_norm", dtype=str(mod.weight.dtype).removeprefix("torch."))
    return w.lw.embedding(n.name, x, TorchConst(mod.weight, f"{n.target}.weight"), w.shape(n), n.target, _kind(mod))


def _batch_norm_module(w: Any, n: Any, mod: nn.modules.batchnorm._BatchNorm, x: Value) -> Any:
    if mod.running_mean is None:
        return w.lw.opaque(n.name, [x], [w.shape(n)], _kind(mod), "batch norm without running statistics")
    t = n.target
    consts = {"scale": _c(mod.weight, f"{t}.weight"), "bias": _c(mod.bias, f"{t}.bias"),
              "mean": _c(mod.running_mean, f"{t}.running_mean"), "var": _c(mod.running_var, f"{t}.running_var")}
    return w.lw.norm(n.name, x, "batch", consts, mod.eps, t)


def _layer_norm_module(w: Any, n: Any, mod: nn.LayerNorm, x: Value) -> Any:
    consts = {"scale": _c(mod.weight, f"{n.target}.weight"), "bias": _c(getattr(mod, "bias", None), f"{n.target}.bias")}
    return w.lw.norm(n.name, x, "layer", consts, mod.eps, n.target, axis=-len(mod.normalized_shape))


def _group_norm_module(w: Any, n: Any, mod: nn.GroupNorm, x: Value) -> Any:
    consts = {"scale": _c(mod.weight, f"{n.target}.weight"), "bias": _c(mod.bias, f"{n.target}.bias")}
    return w.lw.norm(n.name, x, "group", consts, mod.eps, n.target, num_groups=int(mod.num_groups))


def _instance_norm_module(w: Any, n: Any, mod: nn.modules.instancenorm._InstanceNorm, x: Value) -> Any:
    if mod.track_running_stats:
        return w.lw.opaque(n.name, [x], [w.shape(n)], _kind(mod), "instance norm with running statistics")
    consts = {"scale": _c(mod.weight, f"{n.target}.weight"), "bias": _c(mod.bias, f"{n.target}.bias")}
    return w.lw.norm(n.name, x, "instance", consts, mod.eps, n.target)


def _activation_attrs(mod: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """(pointwise op, attrs) for an activation module; None when paic cannot express it."""
    if isinstance(mod, nn.ReLU6):
        return "clip", {"min": 0.0, "max": 6.0}
    if isinstance(mod, nn.Hardtanh):
        return "clip", {"min": float(mod.min_val), "max": float(mod.max_val)}
    if isinstance(mod, nn.LeakyReLU):
        return "leakyrelu", {"alpha": float(mod.negative_slope)}
    if isinstance(mod, nn.GELU):
        return "gelu", {"approximate": mod.approximate}
    if isinstance(mod, (nn.ELU, nn.CELU)):
        return type(mod).__name__.lower(), {"alpha": float(mod.alpha)}
    if isinstance(mod, nn.Softplus):
        return ("softplus", {}) if mod.beta == 1 and mod.threshold == 20 else None
    if isinstance(mod, nn.Hardsigmoid):
        return "hardsigmoid", {"alpha": 1.0 / 6.0, "beta": 0.5}
    simple = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.SELU: "selu",
              nn.Softsign: "softsign", nn.Hardswish: "hardswish", nn.Mish: "mish"}
    op = simple.get(type(mod))
    return None if op is None else (op, {})


def _activation_module(w: Any, n: Any, mod: nn.Module, x: Value) -> Any:
    spec = _activation_attrs(mod)
    if spec is None:
        return w.lw.opaque(n.name, [x], [w.shape(n)], _kind(mod), f"{_kind(mod)} with non-default options")
    return w.lw.pointwise(n.name, x, spec[0], n.target, **spec[1])


def _alias_module(w: Any, n: Any, mod: nn.Module, x: Any, *rest: Any, **kw: Any) -> Any:
    return x


def _softmax_module(w: Any, n: Any, mod: nn.Module, x: Value) -> Any:
    dim = mod.dim if mod.dim is not None else -1
    return w.lw.softmax(n.name, x, dim, n.target, log=isinstance(mod, nn.LogSoftmax))


def _max_pool_module(w: Any, n: Any, mod: Any, x: Value) -> Any:
    if mod.return_indices:
        return w.lw.opaque(n.name, [x], [w.shape(n)], _kind(mod), "max pooling with indices")
    return w.lw.pool(n.name, x, "max", mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode, False, w.shape(n), n.target)


def _avg_pool_module(w: Any, n: Any, mod: Any, x: Value) -> Any:
    if getattr(mod, "divisor_override", None):
        return w.lw.opaque(n.name, [x], [w.shape(n)], _kind(mod), "average pooling with divisor_override")
    return w.lw.pool(n.name, x, "avg", mod.kernel_size, mod.stride, mod.padding, 1, mod.ceil_mode, mod.count_include_pad, w.shape(n), n.target)


def _adaptive_module(w: Any, n: Any, mod: Any, x: Value) -> Any:
    if getattr(mod, "return_indices", False):
        return w.lw.opaque(n.name, [x], [w.shape(n)], _kind(mod), "adaptive max pooling with indices")
    mode = "max" if "Max" in _kind(mod) else "avg"
    return w.lw.adaptive_pool(n.name, x, mode, mod.output_size, w.shape(n), n.target)


def _reshape_module(w: Any, n: Any, mod: nn.Module, x: Value) -> Any:
    return w.lw.reshape(n.name, x, w.shape(n), n.target)


def _pad_module(w: Any, n: Any, mod: Any, x: Value) -> Any:
    if float(getattr(mod, "value", 0.0)) != 0.0:
        return w.lw.opaque(n.name, [x], [w.shape(n)], _kind(mod), "padding with a non-zero value")
    return w.lw.pad(n.name, x, mod.padding, w.shape(n), n.target)


def _upsample_module(w: Any, n: Any, mod: nn.Upsample, x: Value) -> Any:
    return _f_interpolate(w, n, x, mod.size, mod.scale_factor, mod.mode, mod.align_corners, mod.recompute_scale_factor)


def _mha_module(w: Any, n: Any, mod: nn.MultiheadAttention, query: Value, key: Value, value: Value,
                key_padding_mask: Any = None, need_weights: bool = True, attn_mask: Any = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> Any:
    if key_padding_mask is not None or attn_mask is not None or is_causal:
        raise ModelError(f"{n.target}: nn.MultiheadAttention with key_padding_mask/attn_mask/is_causal is not supported")
    if not all(isinstance(t, Value) for t in (query, key, value)):
        raise ModelError(f"{n.target}: nn.MultiheadAttention on constant inputs is not supported")
    shape = w.metas[n.name][0].shape
    out = w.lw.attention(n.name, mod, n.target, query, key, value, shape, n.target)
    return (out, AttentionWeights(n.target))


MODULE_RULES: dict[type, Rule] = {
    nn.Conv1d: _conv_module, nn.Conv2d: _conv_module, nn.Conv3d: _conv_module,
    nn.ConvTranspose1d: _conv_transpose_module, nn.ConvTranspose2d: _conv_transpose_module, nn.ConvTranspose3d: _conv_transpose_module,
    nn.Linear: _linear_module, nn.Embedding: _embedding_module,
    nn.BatchNorm1d: _batch_norm_module, nn.BatchNorm2d: _batch_norm_module, nn.BatchNorm3d: _batch_norm_module,
    nn.LayerNorm: _layer_norm_module, nn.GroupNorm: _group_norm_module,
    nn.InstanceNorm1d: _instance_norm_module, nn.InstanceNorm2d: _instance_norm_module, nn.InstanceNorm3d: _instance_norm_module,
    nn.Softmax: _softmax_module, nn.LogSoftmax: _softmax_module,
    nn.MaxPool1d: _max_pool_module, nn.MaxPool2d: _max_pool_module, nn.MaxPool3d: _max_pool_module,
    nn.AvgPool1d: _avg_pool_module, nn.AvgPool2d: _avg_pool_module, nn.AvgPool3d: _avg_pool_module,
    nn.AdaptiveAvgPool1d: _adaptive_module, nn.AdaptiveAvgPool2d: _adaptive_module, nn.AdaptiveAvgPool3d: _adaptive_module,
    nn.AdaptiveMaxPool1d: _adaptive_module, nn.AdaptiveMaxPool2d: _adaptive_module, nn.AdaptiveMaxPool3d: _adaptive_module,
    nn.Flatten: _reshape_module, nn.Unflatten: _reshape_module,
    nn.Identity: _alias_module, nn.Dropout: _alias_module, nn.Dropout1d: _alias_module, nn.Dropout2d: _alias_module,
    nn.Dropout3d: _alias_module, nn.AlphaDropout: _alias_module,
    nn.ZeroPad2d: _pad_module, nn.ConstantPad1d: _pad_module, nn.ConstantPad2d: _pad_module, nn.ConstantPad3d: _pad_module,
    nn.MultiheadAttention: _mha_module,
    nn.PixelShuffle: lambda w, n, mod, x: w.lw.pixel_shuffle(n.name, x, mod.upscale_factor, False, n.target),
    nn.PixelUnshuffle: lambda w, n, mod, x: w.lw.pixel_shuffle(n.name, x, mod.downscale_factor, True, n.target),
    nn.Upsample: _upsample_module, nn.UpsamplingNearest2d: _upsample_module, nn.UpsamplingBilinear2d: _upsample_module,
}
for _act in (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.GELU, nn.ELU, nn.CELU, nn.Softplus, nn.Hardsigmoid,
             nn.SiLU, nn.Sigmoid, nn.Tanh, nn.SELU, nn.Softsign, nn.Hardswish, nn.Mish):
    MODULE_RULES[_act] = _activation_module


# ---- functions and methods ---------------------------------------------------------------
def _binary(op: str, swap: bool = False) -> Rule:
    def rule(w: Any, n: Any, a: Any, b: Any, *, alpha: Any = None, out: Any = None, rounding_mode: Any = None) -> Any:
        if rounding_mode is not None:
            return w.lw.opaque(n.name, [a, b], [w.shape(n)], f"div(rounding_mode={rounding_mode})", "integer division")
        if alpha not in (None, 1):
            b = w.lw.binary(f"{n.name}_alpha", "mul", b, float(alpha), b.shape if isinstance(b, Value) else None, n.name) if isinstance(b, Value) else TorchConst(w.lw.const(b).value * alpha)
        if swap:
            a, b = b, a
        return w.lw.binary(n.name, op, a, b, w.shape(n), n.name)
    return rule


def _unary(op: str, **fixed: Any) -> Rule:
    def rule(w: Any, n: Any, x: Value, *args: Any, **kwargs: Any) -> Any:
        return w.lw.pointwise(n.name, x, op, n.name, **fixed)
    return rule


def _gelu(w: Any, n: Any, x: Value, approximate: str = "none") -> Any:
    return w.lw.pointwise(n.name, x, "gelu", n.name, approximate=approximate)


def _leaky_relu(w: Any, n: Any, x: Value, negative_slope: float = 0.01, inplace: bool = False) -> Any:
    return w.lw.pointwise(n.name, x, "leakyrelu", n.name, alpha=float(negative_slope))


def _elu(w: Any, n: Any, x: Value, alpha: float = 1.0, inplace: bool = False) -> Any:
    return w.lw.pointwise(n.name, x, "elu", n.name, alpha=float(alpha))


def _hardtanh(w: Any, n: Any, x: Value, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False) -> Any:
    return w.lw.pointwise(n.name, x, "clip", n.name, min=float(min_val), max=float(max_val))


def _clamp(w: Any, n: Any, x: Value, min: Any = None, max: Any = None) -> Any:  # noqa: A002 - torch's names
    if isinstance(min, (Value, TorchConst)) or isinstance(max, (Value, TorchConst)):
        return w.lw.opaque(n.name, [x], [w.shape(n)], "clamp", "clamp with tensor bounds")
    lo = float("-inf") if min is None else float(min)
    hi = float("inf") if max is None else float(max)
    return w.lw.pointwise(n.name, x, "clip", n.name, min=lo, max=hi)


def _softplus(w: Any, n: Any, x: Value, beta: float = 1.0, threshold: float = 20.0) -> Any:
    if beta != 1 or threshold != 20:
        return w.lw.opaque(n.name, [x], [w.shape(n)], "softplus", "softplus with non-default beta/threshold")
    return w.lw.pointwise(n.name, x, "softplus", n.name)


def _alias(w: Any, n: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    return x


def _to(w: Any, n: Any, x: Value, *args: Any, **kwargs: Any) -> Any:
    dtype = w.metas[n.name].dtype
    if dtype == x.dtype:
        return x
    return w.lw.pointwise(n.name, x, "cast", n.name, to=dtype)


def _reshape(w: Any, n: Any, x: Value, *args: Any, **kwargs: Any) -> Any:
    return w.lw.reshape(n.name, x, w.shape(n), n.name)


def _permute_method(kind: str) -> Rule:
    def rule(w: Any, n: Any, x: Value, *args: Any, **kwargs: Any) -> Any:
        rest = list(args) + [kwargs[k] for k in ("dim0", "dim1", "dims") if k in kwargs]
        return w.lw.transpose(n.name, x, perm_of(kind, len(x.shape), rest), n.name)
    return rule


def _expand(w: Any, n: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    return w.lw.expand(n.name, x, w.shape(n), n.name)


def _getattr(w: Any, n: Any, x: Value, name: str) -> Any:
    if name == "shape":
        return tuple(x.shape)
    if name == "ndim":
        return len(x.shape)
    if name == "dtype":
        return getattr(torch, x.dtype)
    if name in ("T", "mT"):
        rank = len(x.shape)
        perm = list(reversed(range(rank))) if name == "T" else list(range(rank - 2)) + [rank - 1, rank - 2]
        return w.lw.transpose(n.name, x, perm, n.name)
    if name == "device":
        return torch.device("cpu")
    raise ModelError(f"{n.name}: attribute {name!r} of a tensor is not supported")


def _size(w: Any, n: Any, x: Value, dim: int | None = None) -> Any:
    return tuple(x.shape) if dim is None else x.shape[dim]


def _dim(w: Any, n: Any, x: Value) -> int:
    return len(x.shape)


def _getitem(w: Any, n: Any, x: Any, index: Any) -> Any:
    if not isinstance(x, Value):
        return operator.getitem(x, index)
    lw = w.lw
    idx = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in idx):
        k = idx.index(Ellipsis)
        used = sum(1 for i in idx if i is not None and i is not Ellipsis)
        idx = idx[:k] + (slice(None),) * (len(x.shape) - used) + idx[k + 1 :]
    cur, axis = x, 0
    for i in idx:
        if i is None:
            continue
        if isinstance(i, slice):
            step = 1 if i.step is None else i.step
            size = cur.shape[axis]
            full = i.start in (None, 0) and step == 1 and (i.stop is None or (isinstance(size, int) and isinstance(i.stop, int) and i.stop >= size))
            if not full:
                if not isinstance(size, int) or any(isinstance(v, sympy.Basic) for v in (i.start, i.stop, i.step)):
                    return lw.opaque(n.name, [x], [w.shape(n)], "getitem", "slicing a batch-sized axis")
                new = list(cur.shape)
                new[axis] = len(range(*i.indices(size)))
                cur = lw.slice(f"{n.name}_slice", cur, axis, i.start, i.stop, step, tuple(new), n.name)
            axis += 1
        elif isinstance(i, int) and not isinstance(i, bool):
            cur = lw.select(f"{n.name}_select", cur, axis, i, n.name)
        else:
            return lw.opaque(n.name, [x], [w.shape(n)], "getitem", f"indexing with {type(i).__name__}")
    return lw.reshape(n.name, cur, w.shape(n), n.name)


def _cat(w: Any, n: Any, tensors: Any, dim: int = 0, axis: int | None = None) -> Any:
    return w.lw.concat(n.name, list(tensors), dim if axis is None else axis, w.shape(n), n.name)


def _stack(w: Any, n: Any, tensors: Any, dim: int = 0) -> Any:
    out = w.shape(n)
    dim %= len(out)
    parts = []
    for i, t in enumerate(tensors):
        v = w.lw.value(t, f"{n.name}_{i}")
        shape = (*v.shape[:dim], 1, *v.shape[dim:])
        parts.append(w.lw.reshape(f"{n.name}_unsqueeze", v, shape, n.name))
    return w.lw.concat(n.name, parts, dim, out, n.name)


def _split_like(unbind: bool = False) -> Rule:
    def rule(w: Any, n: Any, x: Value, *args: Any, dim: int | None = None, **kwargs: Any) -> Any:
        if dim is None:
            dim = 0 if unbind else (args[1] if len(args) > 1 else 0)
        if unbind and args:
            dim = args[0]
        axis = int(dim) % len(x.shape)
        metas = [m for m in w.metas[n.name]]
        if unbind:
            shapes = [(*m.shape[:axis], 1, *m.shape[axis:]) for m in metas]
        else:
            shapes = [m.shape for m in metas]
        sizes = [s[axis] for s in shapes]
        if not all(isinstance(s, int) for s in sizes):
            return w.lw.opaque(n.name, [x], [m.shape for m in metas], str(n.target), "splitting a batch-sized axis")
        parts = w.lw.split(n.name, x, sizes, axis, shapes, n.name)
        if unbind:
            parts = [w.lw.reshape(f"{n.name}_squeeze", p, m.shape, n.name) for p, m in zip(parts, metas)]
        return tuple(parts)
    return rule


def _reduce(mode: str) -> Rule:
    def rule(w: Any, n: Any, x: Value, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Any:
        if isinstance(dim, bool):
            return w.lw.opaque(n.name, [x], [w.shape(n)], str(n.target), "reduction with unexpected arguments")
        axes = None if dim is None else ([dim] if isinstance(dim, int) else list(dim))
        return w.lw.reduce(n.name, x, mode, axes, keepdim, w.shape(n), n.name)
    return rule


def _vector_norm(w: Any, n: Any, x: Value, ord: Any = 2, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Any:
    """``torch.linalg.vector_norm(x, 2, dim, keepdim)``: an L2 reduction (other orders stay opaque)."""
    if ord != 2 or dtype is not None or isinstance(dim, bool):
        return w.lw.opaque(n.name, [x], [w.shape(n)], str(n.target), f"vector norm of order {ord}")
    return _reduce("l2")(w, n, x, dim, keepdim)


def _tensor_norm(w: Any, n: Any, x: Value, p: Any = "fro", dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Any:
    """``x.norm(p, dim, keepdim)`` / ``torch.norm`` (F.normalize's spelling): the L2 norm for p = 2 or 'fro'."""
    return _vector_norm(w, n, x, 2 if p in (2, 2.0, "fro") else p, dim, keepdim, dtype=dtype)


def _normalize(w: Any, n: Any, x: Value, p: Any = 2.0, dim: int = 1, eps: float = 1e-12, out: Any = None) -> Any:
    """``F.normalize`` (Swin-v2's cosine attention): ``x / clamp_min(‖x‖₂ over dim, eps)``, as torch.export spells it."""
    if p not in (2, 2.0) or out is not None or not isinstance(dim, int):
        return w.lw.opaque(n.name, [x], [w.shape(n)], "normalize", f"normalize with p={p}")
    axis = dim % len(x.shape)
    kept = tuple(1 if i == axis else d for i, d in enumerate(x.shape))
    norm = w.lw.reduce(f"{n.name}_norm", x, "l2", [axis], True, kept, n.name)
    norm = w.lw.pointwise(f"{n.name}_eps", norm, "clip", n.name, min=float(eps), max=float("inf"))
    return w.lw.binary(n.name, "div", x, norm, w.shape(n), n.name)


def _softmax(log: bool) -> Rule:
    def rule(w: Any, n: Any, x: Value, dim: int | None = None, _stacklevel: int = 3, dtype: Any = None) -> Any:
        return w.lw.softmax(n.name, x, -1 if dim is None else dim, n.name, log=log)
    return rule


def _matmul(w: Any, n: Any, a: Any, b: Any) -> Any:
    return w.lw.matmul(n.name, a, b, w.shape(n), n.name)


def _baddbmm(w: Any, n: Any, bias: Any, batch1: Any, batch2: Any, *, beta: float = 1, alpha: float = 1) -> Any:
    return w.lw.baddbmm(n.name, bias, batch1, batch2, w.shape(n), n.name, alpha=alpha, beta=beta)


def _f_linear(w: Any, n: Any, input: Value, weight: Any, bias: Any = None) -> Any:  # noqa: A002
    if not isinstance(weight, TorchConst) or isinstance(bias, Value):
        return w.lw.opaque(n.name, [input, weight] + ([bias] if bias is not None else []), [w.shape(n)], "linear", "linear with an activation weight")
    return w.lw.linear(n.name, input, weight, bias, w.shape(n), n.name)


def _f_conv_transpose(w: Any, n: Any, input: Value, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,  # noqa: A002
                      output_padding: Any = 0, groups: int = 1, dilation: Any = 1) -> Any:
    if not isinstance(weight, TorchConst) or isinstance(bias, Value):
        return w.lw.opaque(n.name, [input, weight], [w.shape(n)], "conv_transpose", "transposed convolution with an activation weight")
    return w.lw.conv_transpose(n.name, input, weight, bias, stride, padding, output_padding, dilation, groups, w.shape(n), n.name)


def _f_embedding(w: Any, n: Any, input: Value, weight: Any, padding_idx: Any = None, max_norm: Any = None,  # noqa: A002
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False) -> Any:
    if not isinstance(weight, TorchConst) or weight.broadcast_to is not None or max_norm is not None:
        return w.lw.opaque(n.name, [input, weight], [w.shape(n)], "embedding", "embedding of an activation table or with max_norm")
    return w.lw.embedding(n.name, input, weight, w.shape(n), n.name, "embedding")


def _f_conv(w: Any, n: Any, input: Value, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,  # noqa: A002
            dilation: Any = 1, groups: int = 1) -> Any:
    if not isinstance(weight, TorchConst) or isinstance(bias, Value):
        return w.lw.opaque(n.name, [input, weight], [w.shape(n)], "conv", "convolution with an activation weight")
    return w.lw.conv(n.name, input, weight, bias, stride, padding, dilation, groups, w.shape(n), n.name)


def _f_layer_norm(w: Any, n: Any, input: Value, normalized_shape: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Any:  # noqa: A002
    ns = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    return w.lw.norm(n.name, input, "layer", {"scale": weight, "bias": bias}, eps, n.name, axis=-len(ns))


def _f_batch_norm(w: Any, n: Any, input: Value, running_mean: Any, running_var: Any, weight: Any = None, bias: Any = None,  # noqa: A002
                  training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Any:
    if training or not isinstance(running_mean, TorchConst):
        return w.lw.opaque(n.name, [input], [w.shape(n)], "batch_norm", "batch norm in training mode")
    return w.lw.norm(n.name, input, "batch", {"scale": weight, "bias": bias, "mean": running_mean, "var": running_var}, eps, n.name)


def _f_group_norm(w: Any, n: Any, input: Value, num_groups: int, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Any:  # noqa: A002
    return w.lw.norm(n.name, input, "group", {"scale": weight, "bias": bias}, eps, n.name, num_groups=int(num_groups))


def _f_max_pool(w: Any, n: Any, input: Value, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,  # noqa: A002
                ceil_mode: bool = False, return_indices: bool = False) -> Any:
    if return_indices:
        return w.lw.opaque(n.name, [input], [w.shape(n)], "max_pool", "max pooling with indices")
    return w.lw.pool(n.name, input, "max", kernel_size, stride, padding, dilation, ceil_mode, False, w.shape(n), n.name)


def _f_avg_pool(w: Any, n: Any, input: Value, kernel_size: Any, stride: Any = None, padding: Any = 0, ceil_mode: bool = False,  # noqa: A002
                count_include_pad: bool = True, divisor_override: Any = None) -> Any:
    if divisor_override:
        return w.lw.opaque(n.name, [input], [w.shape(n)], "avg_pool", "average pooling with divisor_override")
    return w.lw.pool(n.name, input, "avg", kernel_size, stride, padding, 1, ceil_mode, count_include_pad, w.shape(n), n.name)


def _f_adaptive(mode: str) -> Rule:
    def rule(w: Any, n: Any, input: Value, output_size: Any, return_indices: bool = False) -> Any:  # noqa: A002
        return w.lw.adaptive_pool(n.name, input, mode, output_size, w.shape(n), n.name)
    return rule


def _f_interpolate(w: Any, n: Any, input: Value, size: Any = None, scale_factor: Any = None, mode: str = "nearest",  # noqa: A002
                   align_corners: Any = None, recompute_scale_factor: Any = None, antialias: bool = False) -> Any:
    """``F.interpolate``: the kernel sees the scale factors unless a size is given or they are recomputed."""
    scales = scale_factor if size is None and not recompute_scale_factor else None
    return w.lw.resize(n.name, input, mode, align_corners, scales, bool(antialias), w.shape(n), n.name)


def _f_pad(w: Any, n: Any, input: Value, pad: Any, mode: str = "constant", value: Any = None) -> Any:  # noqa: A002
    if mode != "constant" or value not in (None, 0, 0.0):
        return w.lw.opaque(n.name, [input], [w.shape(n)], "pad", f"{mode} padding with value {value}")
    return w.lw.pad(n.name, input, pad, w.shape(n), n.name)


def _f_sdpa(w: Any, n: Any, query: Value, key: Value, value: Value, attn_mask: Any = None, dropout_p: float = 0.0,
            is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Any:
    if enable_gqa:
        return w.lw.opaque(n.name, [query, key, value], [w.shape(n)], "scaled_dot_product_attention", "grouped-query attention")
    return w.lw.sdpa(n.name, query, key, value, w.shape(n), n.name, scale=scale, mask=attn_mask, causal=bool(is_causal))


UNARY = {
    "relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "exp": "exp", "log": "log", "sqrt": "sqrt", "abs": "abs",
    "neg": "neg", "erf": "erf", "sin": "sin", "cos": "cos", "reciprocal": "reciprocal", "sign": "sign",
    "floor": "floor", "ceil": "ceil", "round": "round",
}

FUNCTION_RULES: dict[Any, Rule] = {
    nn.functional.pixel_shuffle: lambda w, n, x, upscale_factor: w.lw.pixel_shuffle(n.name, x, upscale_factor, False, n.name),
    nn.functional.pixel_unshuffle: lambda w, n, x, downscale_factor: w.lw.pixel_shuffle(n.name, x, downscale_factor, True, n.name),
    torch.roll: lambda w, n, x, shifts, dims=None: w.lw.roll(n.name, x, shifts, dims, n.name),
    "Tensor.roll": lambda w, n, x, shifts, dims=None: w.lw.roll(n.name, x, shifts, dims, n.name),
    operator.add: _binary("add"), operator.iadd: _binary("add"), torch.add: _binary("add"), "Tensor.add": _binary("add"),
    operator.sub: _binary("sub"), operator.isub: _binary("sub"), torch.sub: _binary("sub"), "Tensor.sub": _binary("sub"),
    torch.rsub: _binary("sub", swap=True), "Tensor.rsub": _binary("sub", swap=True),
    operator.mul: _binary("mul"), operator.imul: _binary("mul"), torch.mul: _binary("mul"), "Tensor.mul": _binary("mul"),
    torch.multiply: _binary("mul"), "Tensor.multiply": _binary("mul"), torch.subtract: _binary("sub"), "Tensor.subtract": _binary("sub"),
    torch.divide: _binary("div"), "Tensor.divide": _binary("div"), torch.true_divide: _binary("div"), "Tensor.true_divide": _binary("div"),
    operator.truediv: _binary("div"), operator.itruediv: _binary("div"), torch.div: _binary("div"), "Tensor.div": _binary("div"),
    operator.pow: _binary("pow"), torch.pow: _binary("pow"), "Tensor.pow": _binary("pow"),
    torch.maximum: _binary("max"), torch.minimum: _binary("min"),
    operator.neg: _unary("neg"),
    operator.matmul: _matmul, torch.matmul: _matmul, "Tensor.matmul": _matmul, torch.bmm: _matmul, "Tensor.bmm": _matmul,
    torch.mm: _matmul, "Tensor.mm": _matmul, torch.baddbmm: _baddbmm, "Tensor.baddbmm": _baddbmm,
    F.relu: _unary("relu"), F.relu_: _unary("relu"), F.silu: _unary("silu"), F.mish: _unary("mish"), F.selu: _unary("selu"),
    F.hardswish: _unary("hardswish"), F.softsign: _unary("softsign"), F.sigmoid: _unary("sigmoid"), F.tanh: _unary("tanh"),
    F.hardsigmoid: _unary("hardsigmoid", alpha=1.0 / 6.0, beta=0.5), F.relu6: _unary("clip", min=0.0, max=6.0),
    F.gelu: _gelu, F.leaky_relu: _leaky_relu, F.elu: _elu, F.hardtanh: _hardtanh, F.softplus: _softplus,
    torch.clamp: _clamp, torch.clip: _clamp, "Tensor.clamp": _clamp, "Tensor.clip": _clamp,
    torch.clamp_min: _clamp, "Tensor.clamp_min": _clamp, torch.clamp_max: lambda w, n, x, max: _clamp(w, n, x, max=max),  # noqa: A006
    "Tensor.clamp_max": lambda w, n, x, max: _clamp(w, n, x, max=max),  # noqa: A006
    F.dropout: _alias, F.dropout1d: _alias, F.dropout2d: _alias, F.dropout3d: _alias, F.alpha_dropout: _alias,
    "Tensor.contiguous": _alias, "Tensor.clone": _alias, "Tensor.detach": _alias, torch.clone: _alias,
    "Tensor.to": _to, "Tensor.float": _to, "Tensor.type_as": _to, "Tensor.type": _to, "Tensor.double": _to,
    "Tensor.int": _to, "Tensor.long": _to, "Tensor.bool": _to,
    torch.flatten: _reshape, "Tensor.flatten": _reshape, "Tensor.view": _reshape, "Tensor.reshape": _reshape,
    torch.reshape: _reshape, "Tensor.unsqueeze": _reshape, torch.unsqueeze: _reshape, "Tensor.squeeze": _reshape,
    torch.squeeze: _reshape, "Tensor.unflatten": _reshape, torch.unflatten: _reshape, "Tensor.view_as": _reshape,
    "Tensor.reshape_as": _reshape,
    "Tensor.permute": _permute_method("permute"), torch.permute: _permute_method("permute"),
    "Tensor.transpose": _permute_method("transpose"), torch.transpose: _permute_method("transpose"),
    "Tensor.t": _permute_method("t"), torch.t: _permute_method("t"),
    "Tensor.expand": _expand, "Tensor.expand_as": _expand,
    getattr: _getattr, "Tensor.size": _size, "Tensor.dim": _dim,
    operator.getitem: _getitem,
    torch.cat: _cat, torch.concat: _cat, torch.stack: _stack,
    torch.chunk: _split_like(), "Tensor.chunk": _split_like(), torch.split: _split_like(), "Tensor.split": _split_like(),
    torch.unbind: _split_like(unbind=True), "Tensor.unbind": _split_like(unbind=True),
    torch.mean: _reduce("avg"), "Tensor.mean": _reduce("avg"), torch.sum: _reduce("sum"), "Tensor.sum": _reduce("sum"),
    torch.amax: _reduce("max"), "Tensor.amax": _reduce("max"),
    torch.linalg.vector_norm: _vector_norm, F.normalize: _normalize, torch.norm: _tensor_norm, "Tensor.norm": _tensor_norm,
    F.softmax: _softmax(False), torch.softmax: _softmax(False), "Tensor.softmax": _softmax(False),
    F.log_softmax: _softmax(True), torch.log_softmax: _softmax(True), "Tensor.log_softmax": _softmax(True),
    F.linear: _f_linear, F.conv1d: _f_conv, F.conv2d: _f_conv, F.conv3d: _f_conv,
    F.conv_transpose1d: _f_conv_transpose, F.conv_transpose2d: _f_conv_transpose, F.conv_transpose3d: _f_conv_transpose,
    F.layer_norm: _f_layer_norm, F.batch_norm: _f_batch_norm, F.group_norm: _f_group_norm,
    F.max_pool1d: _f_max_pool, F.max_pool2d: _f_max_pool, F.max_pool3d: _f_max_pool,
    F.avg_pool1d: _f_avg_pool, F.avg_pool2d: _f_avg_pool, F.avg_pool3d: _f_avg_pool,
    F.adaptive_avg_pool1d: _f_adaptive("avg"), F.adaptive_avg_pool2d: _f_adaptive("avg"), F.adaptive_avg_pool3d: _f_adaptive("avg"),
    F.adaptive_max_pool1d: _f_adaptive("max"), F.adaptive_max_pool2d: _f_adaptive("max"), F.adaptive_max_pool3d: _f_adaptive("max"),
    F.pad: _f_pad, F.interpolate: _f_interpolate, F.upsample: _f_interpolate, F.scaled_dot_product_attention: _f_sdpa, F.embedding: _f_embedding,
}
for _name, _op in UNARY.items():
    for _key in (getattr(torch, _name, None), f"Tensor.{_name}"):
        if _key is not None:
            FUNCTION_RULES.setdefault(_key, _unary(_op))
for _name in ("relu_", "sigmoid_", "tanh_"):
    FUNCTION_RULES[f"Tensor.{_name}"] = _unary(_name.rstrip("_"))
for _key, _rule in FX_INDEX_RULES.items():
    FUNCTION_RULES.setdefault(_key, _rule)
