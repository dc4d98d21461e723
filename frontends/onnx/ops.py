"""ONNX op table: lowers each dynamic ONNX node to IR nodes with symbolic output shapes.

One handler per ONNX op family; the table ``HANDLERS`` maps op_type to handler. An op with
no handler becomes an ``opaque`` node (shape from onnx's inference when it has one) and a
warning. Shape formulas: conv/pool ``out = floor((in + pad_begin + pad_end - dil*(k-1) - 1)
/ stride) + 1`` (ceil for ``ceil_mode``), numpy broadcasting for elementwise ops.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pai_compiler.frontends.onnx.conv_transpose import conv_transpose_spec
from pai_compiler.frontends.onnx.movement import DynamicArgument, Movement, movement_shape
from pai_compiler.frontends.onnx.index_ops import INDEX_HANDLERS
from pai_compiler.frontends.onnx.space_depth import SPACE_DEPTH_HANDLERS
from pai_compiler.frontends.onnx.resize import RESIZE_FIX, UnsupportedResize, resize_spec
from pai_compiler.frontends.onnx.static import Const, broadcast_shapes, is_float_dtype, prod, simplify_dim
from pai_compiler.errors import ModelError
from pai_compiler.ir import Dim, OpKind, Value
from pai_compiler.ir.dims import ceil_div, dim_sum, floor_div, plain
from pai_compiler.onnx_wire import tensor_dtype

__all__ = ["lower_node", "HANDLERS", "POINTWISE_OPS"]

Handler = Callable[[Any, Any, str, list[Any], dict[str, Any]], None]

POINTWISE_OPS = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "Erf", "Elu", "Selu", "Celu", "Softplus", "Softsign",
    "HardSigmoid", "HardSwish", "Exp", "Log", "Sqrt", "Neg", "Abs", "Reciprocal", "Identity", "Dropout",
    "Cast", "Sin", "Cos", "Floor", "Ceil", "Round", "Mish", "ThresholdedRelu", "Sign", "Clip",
}
PAD_FIX = "paic evaluates zero constant padding by constant pads only: pad with zeros (F.pad mode='constant', value=0), or prune with a criterion that runs no forward pass (magnitude, random, random-erk)"
_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow", "Max": "max", "Min": "min"}


def _shape(x: Any) -> tuple[Dim, ...] | None:
    if isinstance(x, Value):
        return x.shape
    return x.broadcast_to or tuple(int(d) for d in x.array.shape)


def _emit(imp: Any, kind: OpKind, node: Any, label: str, inputs: list[Value], shapes: list[tuple[Dim, ...] | None], *, params: dict[str, Any] | None = None, attrs: dict[str, Any] | None = None, dtype: str | None = None, only_first: bool = False) -> None:
    dtype = dtype or (inputs[0].dtype if inputs else "float32")
    names = list(node.output)[:1] if only_first else list(node.output)
    outs = [(o, s, dtype) for o, s in zip(names, shapes) if o]
    ir = imp.graph.add_node(kind, imp.graph.fresh_name(label), inputs, outs, params=params, attrs=attrs, origin=node.name)
    for v in ir.outputs:
        imp.env[v.name] = v


def _need_value(x: Any, label: str, what: str) -> Value:
    if not isinstance(x, Value):
        raise ModelError(f"node {label!r}: {what} must be an activation")
    return x


def _window_out(size: Dim, k: int, stride: int, pb: int, pe: int, dil: int, ceil: bool) -> Dim:
    num = simplify_dim(plain(size) + pb + pe - dil * (k - 1) - 1)
    if isinstance(num, int):
        q = -(-num // stride) if ceil else num // stride
        out = q + 1
        if ceil and (out - 1) * stride >= (size if isinstance(size, int) else 0) + pb and isinstance(size, int):
            out -= 1
        return out
    return simplify_dim((ceil_div if ceil else floor_div)(num, stride) + 1)


def _resolve_pads(attrs: dict[str, Any], spatial: tuple[Dim, ...], kernel: list[int], strides: list[int], dil: list[int], label: str) -> list[int]:
    n = len(kernel)
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", "VALID", "") or auto is None:
        return list(attrs.get("pads", [0] * 2 * n)) if auto != "VALID" else [0] * 2 * n
    pads = [0] * 2 * n
    for i in range(n):
        if not isinstance(spatial[i], int):
            raise ModelError(f"node {label!r}: auto_pad={auto} needs static spatial sizes")
        out = -(-spatial[i] // strides[i])
        total = max(0, (out - 1) * strides[i] + dil[i] * (kernel[i] - 1) + 1 - spatial[i])
        small, big = total // 2, total - total // 2
        pads[i], pads[i + n] = (small, big) if auto == "SAME_UPPER" else (big, small)
    return pads


def _window(attrs: dict[str, Any], x: Value, kernel: list[int], label: str, *, ceil: bool) -> tuple[list[int], list[int], list[int], tuple[Dim, ...] | None]:
    """strides, dilations, explicit pads and output spatial dims of a conv/pool window."""
    n = len(kernel)
    strides = list(attrs.get("strides", [1] * n))
    dil = list(attrs.get("dilations", [1] * n))
    spatial = x.shape[2:] if x.shape is not None else tuple([None] * n)
    pads = _resolve_pads(attrs, spatial, kernel, strides, dil, label)  # type: ignore[arg-type]
    if x.shape is None:
        return strides, dil, pads, None
    return strides, dil, pads, tuple(_window_out(spatial[i], kernel[i], strides[i], pads[i], pads[i + n], dil[i], ceil) for i in range(n))


def _kernel_params(imp: Any, node: Any, label: str, ins: list[Any], key: str, layout: str) -> dict[str, Any] | None:
    """The prunable weight (``layout`` "out, in/groups" or "in, out/groups", then the kernel) and the
    bias of a Conv or ConvTranspose; None when the weight is not a constant (the node stays opaque)."""
    w = ins[1]
    if not isinstance(w, Const) or w.symbolic:
        return None
    if w.array.ndim < 3:
        raise ModelError(f"{node.op_type} weight {w.origin or ''!r} has rank {w.array.ndim}; expected ({layout}, *kernel)")
    out_axis, in_axis = (0, 1) if layout.startswith("out") else (1, 0)
    params = {"weight": imp.param(w, f"{key}_weight", prunable=True, out_axis=out_axis, in_axis=in_axis)}
    if len(ins) > 2 and ins[2] is not None:
        params["bias"] = imp.param(ins[2], f"{key}_bias", prunable=False, out_axis=0, in_axis=None)
    return params


def _conv(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    x = _need_value(ins[0], label, "Conv input")
    params = _kernel_params(imp, node, label, ins, "conv", "out, in/groups")
    if params is None:
        return _opaque(imp, node, label, ins, attrs, reason="Conv with a non-constant weight")
    w = ins[1].array
    kshape = [int(d) for d in w.shape[2:]]
    strides, dil, pads, out_spatial = _window(attrs, x, kshape, label, ceil=False)
    groups = int(attrs.get("group", 1))
    out_shape = None if out_spatial is None else (x.shape[0], int(w.shape[0]), *out_spatial)  # type: ignore[index]
    _emit(imp, OpKind.CONV, node, label, [x], [out_shape], params=params,
          attrs={"strides": strides, "pads": pads, "dilations": dil, "groups": groups, "kernel_shape": kshape})


def _conv_transpose(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    x = _need_value(ins[0], label, "ConvTranspose input")
    params = _kernel_params(imp, node, label, ins, "conv_transpose", "in, out/groups")
    if params is None:
        return _opaque(imp, node, label, ins, attrs, reason="ConvTranspose with a non-constant weight")
    w = ins[1].array
    ir_attrs, out_spatial = conv_transpose_spec(attrs, None if x.shape is None else x.shape[2:], [int(d) for d in w.shape[2:]], label)
    out_channels = int(w.shape[1]) * ir_attrs["groups"]
    out_shape = None if out_spatial is None else (x.shape[0], out_channels, *out_spatial)  # type: ignore[index]
    _emit(imp, OpKind.CONV_TRANSPOSE, node, label, [x], [out_shape], params=params, attrs=ir_attrs)


def _linear_from(imp: Any, node: Any, label: str, x: Value, w: Const, transposed_w: bool, bias: Any, alpha: float, beta: float) -> None:
    # canonical weight is (out, in); transposed_w means the operand is stored as (in, out)
    out_axis, in_axis = (1, 0) if transposed_w else (0, 1)
    out_features = int(w.array.shape[out_axis])
    in_features = int(w.array.shape[in_axis])
    if x.shape is not None and isinstance(x.shape[-1], int) and x.shape[-1] != in_features:
        raise ModelError(f"node {label!r}: input has {x.shape[-1]} features, weight expects {in_features}")
    params = {"weight": imp.param(w, "linear_weight", prunable=True, out_axis=out_axis, in_axis=in_axis)}
    attrs: dict[str, Any] = {"in_features": in_features, "out_features": out_features}
    if alpha != 1.0:
        attrs["alpha"] = alpha
    if bias is not None:
        if isinstance(bias, Const):
            params["bias"] = imp.param(bias, "linear_bias", prunable=False, out_axis=0, in_axis=None)
            if beta != 1.0:
                attrs["beta"] = beta
        else:
            raise ModelError(f"node {label!r}: Gemm with a dynamic C input is not supported")
    shape = None if x.shape is None else (*x.shape[:-1], out_features)
    _emit(imp, OpKind.LINEAR, node, label, [x], [shape], params=params, attrs=attrs)


def _transpose_value(imp: Any, x: Value, perm: list[int], label: str) -> Value:
    shape = None if x.shape is None else tuple(x.shape[p] for p in perm)
    ir = imp.graph.add_node(OpKind.RESHAPE, imp.graph.fresh_name(label + "_transA"), [x], [(imp.graph.fresh_name(x.name + "_T"), shape, x.dtype)], attrs={"op": "transpose", "perm": perm})
    return ir.outputs[0]


def _gemm(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    a, b = ins[0], ins[1]
    c = ins[2] if len(ins) > 2 else None
    if not isinstance(a, Value) or not isinstance(b, Const) or b.symbolic:
        return _opaque(imp, node, label, ins, attrs, reason="Gemm without a constant B")
    if attrs.get("transA", 0):
        a = _transpose_value(imp, a, [1, 0], label)
    _linear_from(imp, node, label, a, b, not attrs.get("transB", 0), c, float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0)))


def _matmul_shape(a: tuple[Dim, ...] | None, b: tuple[Dim, ...] | None) -> tuple[Dim, ...] | None:
    if a is None or b is None:
        return None
    if len(a) == 1 or len(b) == 1:
        return None
    batch = broadcast_shapes(a[:-2], b[:-2])
    return (*batch, a[-2], b[-1])


def _matmul(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    a, b = ins
    if isinstance(a, Value) and isinstance(b, Const) and not b.symbolic and b.array.ndim == 2:
        return _linear_from(imp, node, label, a, b, True, None, 1.0, 1.0)
    va, vb = imp.operand_value(a, label + "_a"), imp.operand_value(b, label + "_b")
    _emit(imp, OpKind.MATMUL, node, label, [va, vb], [_matmul_shape(va.shape, vb.shape)])


def _binary(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    op = _BINARY[node.op_type]
    dyn = [x for x in ins if isinstance(x, Value)]
    shapes = [_shape(x) for x in ins]
    shape = None if any(s is None for s in shapes) else broadcast_shapes(*shapes)  # type: ignore[arg-type]
    if len(ins) == 2 and len(dyn) == 1:
        x = dyn[0]
        const = ins[1] if ins[0] is x else ins[0]
        if const.broadcast_to is None:
            p = imp.param(const, f"{op}_const", prunable=False, in_axis=None)
            _emit(imp, OpKind.POINTWISE, node, label, [x], [shape], params={"const": p},
                  attrs={"op": op, "const_first": ins[0] is not x})
            return
    values = [imp.operand_value(x, f"{label}_{i}") for i, x in enumerate(ins)]
    if op in ("add", "sub"):
        _emit(imp, OpKind.ADD, node, label, values, [shape], attrs={"op": op})
    else:
        _emit(imp, OpKind.MUL, node, label, values, [shape], attrs={"op": op})


def _sum(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    values = [imp.operand_value(x, f"{label}_{i}") for i, x in enumerate(ins)]
    shapes = [v.shape for v in values]
    shape = None if any(s is None for s in shapes) else broadcast_shapes(*shapes)  # type: ignore[arg-type]
    if len(values) == 1:
        _emit(imp, OpKind.POINTWISE, node, label, values, [shape], attrs={"op": "identity"})
    else:
        _emit(imp, OpKind.ADD, node, label, values, [shape], attrs={"op": "add"})


def _pointwise(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    x = _need_value(ins[0], label, "input")
    op = node.op_type.lower()
    out_attrs: dict[str, Any] = {"op": {"dropout": "identity"}.get(op, op)}
    params = {}
    for key in ("alpha", "beta", "gamma", "approximate", "lambd"):
        if key in attrs:
            out_attrs[key] = attrs[key]
    dtype = None
    if node.op_type == "Clip":
        lo = ins[1] if len(ins) > 1 else None
        hi = ins[2] if len(ins) > 2 else None
        if isinstance(lo, Value) or isinstance(hi, Value):
            return _opaque(imp, node, label, ins, attrs, reason="Clip with dynamic bounds")
        out_attrs["min"] = float(lo.array) if lo is not None else float(attrs.get("min", -np.inf))
        out_attrs["max"] = float(hi.array) if hi is not None else float(attrs.get("max", np.inf))
    if node.op_type == "Cast":
        dtype = str(tensor_dtype(attrs["to"]))
        out_attrs["to"] = dtype
    if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1] in imp.consumed:
        mask = imp.graph.add_node(OpKind.OPAQUE, imp.graph.fresh_name(label + "_mask"), [x], [(node.output[1], x.shape, "bool")], attrs={"op_type": "DropoutMask", "domain": ""})
        imp.env[node.output[1]] = mask.outputs[0]
    shapes = [x.shape]
    _emit(imp, OpKind.POINTWISE, node, label, [x], shapes, params=params, attrs=out_attrs, dtype=dtype, only_first=True)


def _cast_like(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    like = ins[1]
    dtype = like.dtype if isinstance(like, Value) else str(like.array.dtype)
    if isinstance(ins[0], Const):  # a constant cast like an activation stays a constant
        c = ins[0]
        same_kind = is_float_dtype(c.array.dtype) and is_float_dtype(dtype)
        if (c.origin is not None and same_kind) or c.broadcast_to is not None:
            imp.env[node.output[0]] = Const(c.array.astype(dtype), c.origin if same_kind else None, c.perm if same_kind else None, c.broadcast_to)
        else:
            imp.env[node.output[0]] = Const.folded(c.array.astype(dtype), node.output[0])
        return
    x = ins[0]
    _emit(imp, OpKind.POINTWISE, node, label, [x], [x.shape], attrs={"op": "cast", "to": dtype}, dtype=dtype)


def _prelu(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    x = _need_value(ins[0], label, "input")
    if not isinstance(ins[1], Const):
        return _opaque(imp, node, label, ins, attrs, reason="PRelu with a dynamic slope")
    p = imp.param(ins[1], "prelu_slope", prunable=False, in_axis=None)
    _emit(imp, OpKind.POINTWISE, node, label, [x], [x.shape], params={"const": p}, attrs={"op": "prelu"})


def _norm(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    x = _need_value(ins[0], label, "input")
    names = {
        "BatchNormalization": ("batch", ["scale", "bias", "mean", "var"]),
        "InstanceNormalization": ("instance", ["scale", "bias"]),
        "LayerNormalization": ("layer", ["scale", "bias"]),
        "GroupNormalization": ("group", ["scale", "bias"]),
    }[node.op_type]
    params = {}
    for key, c in zip(names[1], ins[1:]):
        if c is None:
            continue
        if not isinstance(c, Const):
            return _opaque(imp, node, label, ins, attrs, reason=f"{node.op_type} with dynamic {key}")
        params[key] = imp.param(c, f"norm_{key}", prunable=False, out_axis=0, in_axis=None)
    out_attrs: dict[str, Any] = {"type": names[0], "epsilon": float(attrs.get("epsilon", 1e-5))}
    if node.op_type == "LayerNormalization":
        out_attrs["axis"] = int(attrs.get("axis", -1))
    if node.op_type == "GroupNormalization":
        out_attrs["num_groups"] = int(attrs["num_groups"])
    used = [o for o in node.output[1:] if o in imp.consumed]
    if used:
        raise ModelError(f"node {label!r} ({node.op_type}): training-mode outputs {used} are not supported")
    _emit(imp, OpKind.NORM, node, label, [x], [x.shape], params=params, attrs=out_attrs, only_first=True)


def _lrn(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    x = _need_value(ins[0], label, "input")
    out_attrs = {"type": "lrn", "epsilon": 0.0, "size": int(attrs["size"]), "alpha": float(attrs.get("alpha", 1e-4)),
                 "beta": float(attrs.get("beta", 0.75)), "bias": float(attrs.get("bias", 1.0))}
    _emit(imp, OpKind.NORM, node, label, [x], [x.shape], attrs=out_attrs)


def _softmax(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    """Softmax/LogSoftmax over ``axis``; before opset 13 over the input coerced to 2-D at
    ``axis`` (default 1): ``(prod(shape[:axis]), prod(shape[axis:]))``, then back."""
    x = _need_value(ins[0], label, "input")
    log = node.op_type == "LogSoftmax"
    if imp.opset.get("", 13) >= 13:
        return _emit(imp, OpKind.SOFTMAX, node, label, [x], [x.shape], attrs={"axis": int(attrs.get("axis", -1)), "log": log})
    if x.shape is None:
        return _opaque(imp, node, label, ins, attrs, reason=f"{node.op_type}-{imp.opset['']} of unknown rank")
    rank = len(x.shape)
    axis = int(attrs.get("axis", 1)) % rank if rank else 0
    if all(d == 1 for d in x.shape[axis + 1 :]):  # one non-trivial axis at or after ``axis``: a plain softmax over it
        return _emit(imp, OpKind.SOFTMAX, node, label, [x], [x.shape], attrs={"axis": axis if axis < rank else -1, "log": log})
    flat = (prod(x.shape[:axis]), prod(x.shape[axis:]))
    rows = _reshape_value(imp, x, flat, label + "_2d")
    ir = imp.graph.add_node(OpKind.SOFTMAX, imp.graph.fresh_name(label + "_2d"), [rows], [(imp.graph.fresh_name(x.name + "_sm"), flat, x.dtype)],
                            attrs={"axis": 1, "log": log}, origin=node.name)
    _emit(imp, OpKind.RESHAPE, node, label, [ir.outputs[0]], [x.shape], attrs={"op": "reshape", "shape": list(x.shape)})


def _tile(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    """``Tile(x, repeats)`` that constant folding could not do (a count from the input's shape: Bloom's
    alibi repeated over the batch, or ``x`` an activation): each axis split into (1, size), expanded to
    (count, size) and merged back to count · size, which is right at every bound size."""
    x, repeats = ins
    value = imp.operand_value(x, f"{label}_x")
    counts = [] if not isinstance(repeats, Const) else [d if not isinstance(d, (int, np.integer)) else int(d) for d in repeats.array.reshape(-1)]
    if value.shape is None or len(counts) != len(value.shape):
        return _opaque(imp, node, label, ins, attrs, reason="Tile with run-time repeats or of unknown rank")
    split = tuple(d for size in value.shape for d in (1, size))
    tiled = tuple(d for count, size in zip(counts, value.shape) for d in (count, size))
    out = tuple(simplify_dim(plain(count) * plain(size)) for count, size in zip(counts, value.shape))
    v = _reshape_value(imp, value, split, label + "_split")
    ir = imp.graph.add_node(OpKind.RESHAPE, imp.graph.fresh_name(label + "_tile"), [v], [(imp.graph.fresh_name(value.name + "_t"), tiled, value.dtype)],
                            attrs={"op": "expand"}, origin=node.name)
    _emit(imp, OpKind.RESHAPE, node, label, [ir.outputs[0]], [out], attrs={"op": "reshape", "shape": list(out)})


def _reshape_value(imp: Any, x: Value, shape: tuple[Dim, ...], label: str) -> Value:
    ir = imp.graph.add_node(OpKind.RESHAPE, imp.graph.fresh_name(label), [x], [(imp.graph.fresh_name(x.name + "_r"), shape, x.dtype)],
                            attrs={"op": "reshape", "shape": list(shape)})
    return ir.outputs[0]


def _pool(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    x = _need_value(ins[0], label, "input")
    mode = "max" if "Max" in node.op_type else "avg"
    if node.op_type.startswith("Global"):
        shape = None if x.shape is None else (*x.shape[:2], *([1] * (len(x.shape) - 2)))
        axes = list(range(2, len(x.shape))) if x.shape is not None else [2, 3]
        _emit(imp, OpKind.POOL, node, label, [x], [shape], attrs={"mode": mode, "reduce": True, "axes": axes, "keepdims": True})
        return
    kernel = list(attrs["kernel_shape"])
    ceil = bool(attrs.get("ceil_mode", 0))
    strides, dil, pads, out_spatial = _window(attrs, x, kernel, label, ceil=ceil)
    shape = None if out_spatial is None else (*x.shape[:2], *out_spatial)  # type: ignore[index]
    out_attrs = {"mode": mode, "reduce": False, "kernel_shape": kernel, "strides": strides, "pads": pads, "dilations": dil, "ceil_mode": ceil}
    if mode == "avg":
        out_attrs["count_include_pad"] = bool(attrs.get("count_include_pad", 0))
    if len(node.output) > 1 and node.output[1] in imp.consumed:
        raise ModelError(f"node {label!r} (MaxPool): the indices output is not supported")
    _emit(imp, OpKind.POOL, node, label, [x], [shape], attrs=out_attrs, only_first=True)


def _reduce(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    x = _need_value(ins[0], label, "input")
    if x.shape is None:
        return _opaque(imp, node, label, ins, attrs, reason="reduction of unknown rank")
    rank = len(x.shape)
    axes = attrs.get("axes")
    if len(ins) > 1 and ins[1] is not None:
        if not isinstance(ins[1], Const):
            return _opaque(imp, node, label, ins, attrs, reason="dynamic reduction axes")
        axes = [int(a) for a in ins[1].array.reshape(-1)]
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return _emit(imp, OpKind.POINTWISE, node, label, [x], [x.shape], attrs={"op": "identity"})
        axes = list(range(rank))
    axes = sorted(a % rank for a in axes)
    keep = bool(attrs.get("keepdims", 1))
    shape = tuple((1 if i in axes else d) for i, d in enumerate(x.shape) if keep or i not in axes)
    mode = {"ReduceMean": "avg", "ReduceMax": "max", "ReduceSum": "sum", "ReduceL2": "l2"}[node.op_type]
    _emit(imp, OpKind.POOL, node, label, [x], [shape], attrs={"mode": mode, "reduce": True, "axes": axes, "keepdims": keep})


def _movement(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    """Data movement of an activation: one RESHAPE node (``movement``'s rules), opaque when an argument is dynamic."""
    if not isinstance(ins[0], Value):  # a constant reshaped/sliced by run-time sizes (a positional table cut to the sequence)
        data = [x for x in ins if not (isinstance(x, Const) and x.symbolic)]  # the run-time sizes are shape math, not data
        return _opaque(imp, node, label, data, attrs, reason=f"{node.op_type} of a constant by run-time sizes")
    x = ins[0]
    try:
        shape, out_attrs = movement_shape(node.op_type, Movement(x.shape, ins, attrs))
    except DynamicArgument:
        return _opaque(imp, node, label, ins, attrs, reason=f"{node.op_type} with a dynamic or unsupported argument")
    _emit(imp, OpKind.RESHAPE, node, label, [x], [shape], attrs=out_attrs)


def _concat(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    values = [imp.operand_value(x, f"{label}_{i}") for i, x in enumerate(ins) if x is not None]
    axis = int(attrs["axis"])
    shape = None
    if all(v.shape is not None for v in values):
        rank = len(values[0].shape)
        axis = axis % rank
        base = list(broadcast_shapes(*[tuple(d for i, d in enumerate(v.shape) if i != axis) for v in values]))
        base.insert(axis, simplify_dim(dim_sum(v.shape[axis] for v in values)))
        shape = tuple(base)
    _emit(imp, OpKind.CONCAT, node, label, values, [shape], attrs={"axis": axis})


def _split(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    x = _need_value(ins[0], label, "input")
    if x.shape is None:
        return _opaque(imp, node, label, ins, attrs, reason="Split of unknown rank")
    axis = int(attrs.get("axis", 0)) % len(x.shape)
    sizes = attrs.get("split")
    if len(ins) > 1 and ins[1] is not None:
        if not isinstance(ins[1], Const) or ins[1].symbolic:
            return _opaque(imp, node, label, ins, attrs, reason="Split with dynamic sizes")
        sizes = [int(v) for v in ins[1].array.reshape(-1)]
    total = x.shape[axis]
    if sizes is None:
        if not isinstance(total, int):
            return _opaque(imp, node, label, ins, attrs, reason="Split of a symbolic axis")
        n = len(node.output)
        chunk = -(-total // n)
        sizes = [min(chunk, total - i * chunk) for i in range(n)]
    shapes = [tuple(sz if i == axis else d for i, d in enumerate(x.shape)) for sz in sizes]
    _emit(imp, OpKind.SPLIT, node, label, [x], shapes, attrs={"axis": axis, "sizes": list(sizes)})


def _pad(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    x = _need_value(ins[0], label, "input")
    mode = attrs.get("mode", "constant")
    pads = attrs.get("pads")  # Pad-2: pads and value are attributes; Pad-11: inputs; Pad-18: axes too
    if len(ins) > 1 and ins[1] is not None:
        if not isinstance(ins[1], Const) or ins[1].symbolic:
            return _opaque(imp, node, label, ins, attrs, reason="Pad with dynamic pads", fix=PAD_FIX)
        pads = [int(v) for v in ins[1].array.reshape(-1)]
    value = float(attrs.get("value", 0.0))
    if len(ins) > 2 and ins[2] is not None:
        if not isinstance(ins[2], Const):
            return _opaque(imp, node, label, ins, attrs, reason="Pad with a dynamic value", fix=PAD_FIX)
        value = float(np.asarray(ins[2].array).reshape(-1)[0])
    if mode != "constant" or value != 0.0 or x.shape is None or pads is None:
        what = f"mode {mode!r}" if mode != "constant" else (f"value {value}" if value != 0.0 else "unknown rank")
        return _opaque(imp, node, label, ins, attrs, reason=f"Pad with {what}", fix=PAD_FIX)
    n = len(x.shape)
    if len(ins) > 3 and ins[3] is not None:
        if not isinstance(ins[3], Const):
            return _opaque(imp, node, label, ins, attrs, reason="Pad with dynamic axes", fix=PAD_FIX)
        axes = [int(a) % n for a in ins[3].array.reshape(-1)]
        full = [0] * 2 * n
        for i, axis in enumerate(axes):
            full[axis], full[axis + n] = pads[i], pads[i + len(axes)]
        pads = full
    shape = tuple(simplify_dim(plain(d) + pads[i] + pads[i + n]) for i, d in enumerate(x.shape))
    _emit(imp, OpKind.RESHAPE, node, label, [x], [shape], attrs={"op": "pad", "pads": pads})


def _gather(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    """Gather: data movement of an activation by constant indices, or an embedding lookup."""
    if (isinstance(ins[0], Const) and not ins[0].symbolic and ins[0].broadcast_to is None and isinstance(ins[1], Value)
            and is_float_dtype(ins[0].array.dtype) and not ins[1].dtype.startswith(("float", "bfloat", "bool"))):
        return _embedding(imp, node, label, ins, attrs)
    if isinstance(ins[0], Value) and isinstance(ins[1], Value) and not ins[1].dtype.startswith(("float", "bfloat", "bool")):
        return _dynamic_gather(imp, node, label, ins, attrs)
    _movement(imp, node, label, ins, attrs)


def _dynamic_gather(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    """An activation gathered by run-time indices (``as_strided`` positions computed from sizes):
    an opaque ``op="gather"`` node that moves values and path counts alike.
    Shape: ``data.shape[:axis] + indices.shape + data.shape[axis + 1:]``."""
    data, idx = ins[0], ins[1]
    if data.shape is None or idx.shape is None:
        return _opaque(imp, node, label, ins, attrs, reason="Gather by run-time indices of unknown shape")
    axis = int(attrs.get("axis", 0)) % len(data.shape)
    shape = (*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :])
    ir = imp.graph.add_node(OpKind.OPAQUE, imp.graph.fresh_name(label), [data, idx], [(node.output[0], shape, data.dtype)],
                            attrs={"op": "gather", "axis": axis, "op_type": node.op_type, "domain": node.domain}, origin=node.name)
    imp.env[node.output[0]] = ir.outputs[0]


def _embedding(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    """Rows of a constant table picked by dynamic integer indices (``nn.Embedding``): an
    ``opaque`` node with ``op="embedding"`` (which the interpreter evaluates: the lookup, or a
    path source in paths mode), the indices as its one input and the table as its dense,
    non-prunable ``table`` Param, exactly as the torch frontends lower ``nn.Embedding``.
    Shape: ``table.shape[:axis] + indices.shape + table.shape[axis + 1:]``, dtype the table's.
    Indices computed from sizes only (``positional``) make the lookup a constant of the model."""
    table, idx = ins[0], ins[1]
    axis = int(attrs.get("axis", 0)) % table.array.ndim
    if table.perm is not None and tuple(table.perm) != tuple(range(table.array.ndim)):
        table = Const(np.asarray(table.array))  # a transposed initializer: its own (anonymous) copy
    p = imp.param(table, f"{label}_table", prunable=False, in_axis=None)
    dims = tuple(int(d) for d in p.shape)
    shape = None if idx.shape is None else (*dims[:axis], *idx.shape, *dims[axis + 1 :])
    out_attrs: dict[str, Any] = {"op": "embedding", "axis": axis, "op_type": node.op_type, "domain": node.domain}
    if idx.producer is not None and idx.producer.attrs.get("op") == "shape_data":
        out_attrs["positional"] = True  # indices from sizes (positions, relative buckets): a constant, as a static export folds it
    ir = imp.graph.add_node(OpKind.OPAQUE, imp.graph.fresh_name(label), [idx], [(node.output[0], shape, str(p.data.dtype))],
                            params={"table": p}, attrs=out_attrs, origin=node.name)
    imp.env[node.output[0]] = ir.outputs[0]


def _isnan(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    x = _need_value(ins[0], label, "input")
    _emit(imp, OpKind.POINTWISE, node, label, [x], [x.shape], attrs={"op": "isnan"}, dtype="bool")


def _where(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    """Where: the NaN guard ``Where(IsNaN(x), c, x)`` that exporters put after softmax (SDPA) is
    the pointwise ``nan_to_value``; any other select an opaque ``op="where"`` node (the
    interpreter's ``where``: real select, paths of both branches summed)."""
    cond, a, b = ins
    test = cond.producer if isinstance(cond, Value) else None
    if (test is not None and test.kind is OpKind.POINTWISE and test.attrs.get("op") == "isnan" and test.inputs[0] is b
            and isinstance(a, Const) and not a.symbolic and a.broadcast_to is None and a.array.size == 1
            and b.shape is not None and broadcast_shapes(b.shape, a.array.shape) == b.shape):
        _emit(imp, OpKind.POINTWISE, node, label, [b], [b.shape], attrs={"op": "nan_to_value", "value": float(a.array.reshape(-1)[0])})
        if not cond.uses and cond.name not in imp.consumed_elsewhere(node):
            imp.graph.remove_node(test)
        return
    values = [imp.operand_value(x, f"{label}_{i}") for i, x in enumerate(ins)]
    shapes = [v.shape for v in values]
    shape = None if any(sh is None for sh in shapes) else broadcast_shapes(*shapes)  # type: ignore[arg-type]
    dtype = values[1].dtype if not values[1].dtype.startswith("bool") else values[2].dtype
    ir = imp.graph.add_node(OpKind.OPAQUE, imp.graph.fresh_name(label), values, [(node.output[0], shape, dtype)],
                            attrs={"op": "where", "op_type": "Where", "domain": node.domain}, origin=node.name)
    imp.env[node.output[0]] = ir.outputs[0]


def _resize(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    """Resize / Upsample, nearest or linear: an opaque ``op="resize"`` node (``frontends/onnx/resize.py``);
    any other resize stays opaque with the reason and the user's fix."""
    x = _need_value(ins[0], label, "input")
    try:
        out_attrs, shape = resize_spec(node.op_type, imp.opset.get("", 13), x, ins, attrs)
    except UnsupportedResize as exc:
        return _opaque(imp, node, label, ins, attrs, reason=f"{node.op_type} with {exc}", fix=RESIZE_FIX)
    _emit(imp, OpKind.OPAQUE, node, label, [x], [shape], attrs={"op": "resize", **out_attrs, "op_type": node.op_type, "domain": node.domain})


def _opaque(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any], reason: str = "", fix: str = "") -> None:
    values = [imp.operand_value(x, f"{label}_{i}") for i, x in enumerate(ins) if x is not None]
    shapes = [imp.inferred_shape(o) if o else None for o in node.output]
    why = reason or f"operator {node.op_type} is not in paic's op table"
    imp.warnings.append(f"node {label!r} ({node.op_type}) is opaque: {why}")
    dtype = values[0].dtype if values else "float32"
    outs = [(o, s, dtype) for o, s in zip(node.output, shapes) if o]
    ir = imp.graph.add_node(OpKind.OPAQUE, imp.graph.fresh_name(label), values, outs,
                            attrs={"op_type": node.op_type, "domain": node.domain, "reason": why, **({"fix": fix} if fix else {})}, origin=node.name)
    for v in ir.outputs:
        imp.env[v.name] = v


HANDLERS: dict[str, Handler] = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _matmul, "Sum": _sum, "PRelu": _prelu, "CastLike": _cast_like,
    "BatchNormalization": _norm, "LayerNormalization": _norm, "InstanceNormalization": _norm, "GroupNormalization": _norm,
    "LRN": _lrn, "Softmax": _softmax, "LogSoftmax": _softmax,
    "MaxPool": _pool, "AveragePool": _pool, "GlobalAveragePool": _pool, "GlobalMaxPool": _pool,
    "ReduceMean": _reduce, "ReduceMax": _reduce, "ReduceSum": _reduce, "ReduceL2": _reduce,
    "Reshape": _movement, "Flatten": _movement, "Transpose": _movement, "Squeeze": _movement, "Unsqueeze": _movement,
    "Slice": _movement, "Gather": _gather, "Expand": _movement, "Tile": _tile,
    "Concat": _concat, "Split": _split, "Pad": _pad, "IsNaN": _isnan, "Where": _where, "Resize": _resize, "Upsample": _resize,
}
HANDLERS.update({op: _binary for op in _BINARY})
HANDLERS.update({op: _pointwise for op in POINTWISE_OPS})
HANDLERS.update(INDEX_HANDLERS)
HANDLERS.update(SPACE_DEPTH_HANDLERS)


def lower_node(imp: Any, node: Any, label: str, ins: list[Any], attrs: dict[str, Any]) -> None:
    handler = HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if handler is None:
        return _opaque(imp, node, label, ins, attrs)
    if node.op_type in _BINARY and len(ins) != 2:
        if node.op_type in ("Max", "Min") or any(x is None for x in ins):
            return _opaque(imp, node, label, ins, attrs, reason=f"{node.op_type} with {len(ins)} inputs")
    handler(imp, node, label, ins, attrs)
