"""The ``paths``-mode rule bodies that differ from the real ones, and fused attention in both modes.

Gate rule for products (``paths(A@B) = paths(A)@1 + 1@paths(B)``, ``paths(a*b) = paths(a) + paths(b)``),
norms/activations/softmax as identity (broadcast to the output), adds summing counts, a select
routing either branch, an embedding lookup as a path source, a float tensor computed from sizes
as a data constant (zeros). ``attention`` evaluates a fused multi-head attention node, real or
paths (every projection carries paths), with its DPaI log scale and its ``out_proj`` input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pai_compiler.interp_index_rules import lookup_shape, shape_data
from pai_compiler.interp_rules import RuleContext
from pai_compiler.ir import Node, OpKind

__all__ = ["path_mul", "path_identity", "path_add", "AttentionOutput", "attention", "path_embedding", "path_where", "path_shape_data"]


# ---- path-count semantics (override the real ones) ---------------------------------------
def path_mul(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gate rule: a path through a product goes through one factor; the other is a unit gate."""
    a, b = args
    if node.kind is OpKind.MATMUL:
        return [torch.matmul(a, torch.ones_like(b)) + torch.matmul(torch.ones_like(a), b)]
    return [a + b]


def path_identity(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    shape = node.outputs[0].shape
    x = args[0]
    if shape is not None and list(x.shape) != it.dims(shape):
        x = x.expand(*it.dims(shape))
    return [x]


def path_add(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    out = args[0]
    for t in args[1:]:
        out = out + t  # a subtraction still routes paths: counts add
    return [out]


# ---- attention (torch frontends: one node per nn.MultiheadAttention) ----------------------
@dataclass(frozen=True)
class AttentionOutput:
    """A fused attention node's output, the input of its ``out_proj`` and its DPaI log scale."""

    output: torch.Tensor
    out_proj_input: torch.Tensor
    log_scale: torch.Tensor | None = None  # paths with scaling="dpai": Σ log max of the inputs it rescaled


def attention(it: RuleContext, node: Node, args: list[torch.Tensor], *, paths: bool = False) -> AttentionOutput:
    """Multi-head attention with inputs ``args[attrs["qkv"][i]]`` for query, key, value.

    Real: ``F.multi_head_attention_forward`` semantics in eval mode (no masks, no dropout):
    ``out_proj(softmax(q k^T / sqrt(d)) v)`` per head, with q/k/v the three row blocks of
    ``in_proj_weight`` (or ``q/k/v_proj_weight``) plus ``in_proj_bias``. Paths: the same
    dataflow with the masks as weights and no biases, the *gate rule* for both products
    (``paths(QK^T) = Q@1 + 1@K^T``, ``paths(AV) = A@1 + 1@V``), softmax and the 1/sqrt(d)
    scale as identity, exactly as the decomposed ONNX graph counts them. With
    ``scaling="dpai"`` the key/value inputs and the input of ``out_proj`` are divided by their
    max too (as they are for the separate linears of an ONNX graph): the logs are ``log_scale``.
    """
    a, p = node.attrs, node.params
    q_in, k_in, v_in = (args[i] for i in a.get("qkv", (0, 0, 0)))
    rescale = paths and it.scaling == "dpai"
    log_scale = torch.zeros((), dtype=it.dtype, device=it.device) if rescale else None
    if rescale:
        k_in, v_in, log_scale = _dpai_key_value(q_in, k_in, v_in, log_scale)
    unbatched = q_in.dim() == 2
    batch_first = a.get("batch_first", False)

    def to_nle(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(0) if unbatched else (t if batch_first else t.transpose(0, 1))

    o = _heads(it, node, to_nle(q_in), to_nle(k_in), to_nle(v_in), paths=paths)
    out_proj_input = o
    if log_scale is not None:
        m = o.max()
        if m > 0:
            o = o / m
            log_scale = log_scale + torch.log(m)
    bias = it.weight(p["out_proj_bias"]) if not paths and "out_proj_bias" in p else None
    out = F.linear(o, it.oi_weight(p["out_proj_weight"]), bias)
    out = out.squeeze(0) if unbatched else (out if batch_first else out.transpose(0, 1))
    return AttentionOutput(out, out_proj_input, log_scale)


def _dpai_key_value(q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor, log_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key and value inputs divided by their max (each distinct tensor once; the query is rescaled by the caller)."""
    seen = {id(q_in): q_in}
    for t in (k_in, v_in):
        if id(t) not in seen:
            m = t.max()
            if m > 0:
                seen[id(t)] = t / m
                log_scale = log_scale + torch.log(m)
            else:
                seen[id(t)] = t
    return seen[id(k_in)], seen[id(v_in)], log_scale


def _heads(it: RuleContext, node: Node, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor, *, paths: bool) -> torch.Tensor:
    """The per-head products on (N, L, E) inputs, concatenated back to (N, L_q, E): ``out_proj``'s input."""
    p = node.params
    if "in_proj_weight" in p:
        wq, wk, wv = it.oi_weight(p["in_proj_weight"]).chunk(3, 0)
    else:
        wq, wk, wv = (it.oi_weight(p[f"{x}_proj_weight"]) for x in "qkv")
    bq = bk = bv = None
    if not paths and "in_proj_bias" in p:
        bq, bk, bv = it.weight(p["in_proj_bias"]).chunk(3, 0)
    heads = int(node.attrs["num_heads"])
    n, lq, lk = q_in.shape[0], q_in.shape[1], k_in.shape[1]
    q = F.linear(q_in, wq, bq).reshape(n, lq, heads, -1).transpose(1, 2)
    k = F.linear(k_in, wk, bk).reshape(n, lk, heads, -1).transpose(1, 2)
    v = F.linear(v_in, wv, bv).reshape(n, lk, heads, -1).transpose(1, 2)
    if paths:
        kt = k.transpose(-2, -1)
        scores = torch.matmul(q, torch.ones_like(kt)) + torch.matmul(torch.ones_like(q), kt)
        o = torch.matmul(scores, torch.ones_like(v)) + torch.matmul(torch.ones_like(scores), v)
    else:  # explicit softmax (not F.scaled_dot_product_attention): GraSP needs a double backward
        scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-2, -1))
        o = torch.matmul(torch.softmax(scores, dim=-1), v)
    return o.transpose(1, 2).reshape(n, lq, -1)


def path_embedding(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """A path source: one path starts at every output element (the indices carry none). A
    ``positional`` lookup (indices computed from sizes: positions, relative buckets) is a
    constant of the model, which carries no paths, exactly as a static export folds it."""
    fill = torch.zeros if node.attrs.get("positional") else torch.ones
    return [fill(lookup_shape(node, node.params["table"].shape, args[0]), dtype=it.dtype, device=it.device)]


def path_where(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """A select routes the paths of either branch (the condition is a gate): counts add, broadcast."""
    out = torch.zeros(it.dims(node.outputs[0].shape), dtype=it.dtype, device=it.device)
    return [out + args[1].to(it.dtype) + args[2].to(it.dtype)]


def path_shape_data(it: RuleContext, node: Node, args: list[torch.Tensor]) -> list[torch.Tensor]:
    """A float tensor computed from sizes (a mask) is a data constant: zeros, no paths. Integer
    and bool ones are positions and indices, which gathers read: their real values."""
    value = shape_data(it, node, args)[0]
    return [torch.zeros_like(value, dtype=it.dtype)] if value.is_floating_point() else [value]
