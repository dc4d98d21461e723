"""Which kept weights lie on an input->output path: ``effective = kept ∧ ∂rule/∂W > 0``, booleans only.

Never decided with small float gradients: a forward reachability sweep (the path rule of each
node on 0/1 indicators, re-thresholded after every node), a backward sweep (the local autograd
VJP of each node's path rule with 0/1 output indicators, re-thresholded at every node, in
reverse topological order), then ``∂rule/∂W > 0`` with the forward indicators as input and the
backward indicators as the VJP's cotangent. Every path rule is linear with non-negative
coefficients on 0/1 operands: a true zero is computed exactly as 0 and a positive count stays
positive, so ``> 0`` is exact even in bfloat16. Products of two activations follow the
interpreter's gate rule (a path goes through one factor while the other acts as a unit gate).
torch is imported where the sweeps run, never at module level.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from pai_compiler.errors import PaicError
from pai_compiler.ir import Graph, Node, OpKind, Param
from pai_compiler.passes.analysis.layer_paths import prunable_layers
from pai_compiler.passes.analysis.paths import ones_inputs

if TYPE_CHECKING:
    import torch

__all__ = ["path_rule", "weight_reachability"]


def path_rule(node: Node) -> Any:
    """The interpreter's paths-mode rule of ``node``; a PaicError naming the node when it has none."""
    from pai_compiler.interp_tables import rule_for  # imports torch

    rule = rule_for(node, "paths")
    if rule is None and node.kind is OpKind.OPAQUE:
        raise PaicError(f"node-path: node {node.name!r} is opaque ({node.attrs.get('op_type', '?')}): paths through it are undefined")
    if rule is None:
        raise PaicError(f"node-path: node {node.name!r} ({node.kind.value}) has no path rule")
    return rule


def weight_reachability(graph: Graph, bind: dict[str, int], dtype: Any = None, live: dict[str, tuple[int, int]] | None = None,
                         on_node: Callable[[], None] | None = None) -> dict[str, np.ndarray]:
    """``∂(path rule)/∂W > 0`` per prunable weight, from 0/1 forward indicators and 0/1 output grads.

    ``live`` (filled when given): per boolean-indicator value, (elements reached from an input
    that reach an output, all elements), counted once its cotangent is complete. ``on_node()`` is
    called after each node of either sweep (a progress tick).

    Two sweeps keep memory at the activations plus one layer: the forward sweep (no autograd)
    stores each value's 0/1 indicator; the backward sweep re-runs one node at a time with
    autograd on its inputs and its weights' 0/1 operands, thresholds the weight gradients to
    booleans at once, and frees every indicator and cotangent after its last use.
    """
    import torch  # heavy optional dependency: only the path analysis needs it

    from pai_compiler.interp import Interpreter  # imports torch

    dtype = dtype or _indicator_dtype()
    params = {p.name: p for p, _ in prunable_layers(graph)}
    it = Interpreter(graph, mode="paths", dtype=dtype, pool="sum", bind=bind, distinct_rows=True)
    inputs = [v.name for v in graph.inputs]
    forward: dict[str, torch.Tensor] = dict(zip(inputs, ones_inputs(graph, bind, dtype)))
    nodes = [n for n in graph.nodes if n.kind not in (OpKind.INPUT, OpKind.OUTPUT)]
    first_use: dict[str, int] = {}
    # NNPACK's Winograd/FFT convolutions would mix signs; direct/GEMM kernels keep 0 exact
    with torch.no_grad(), torch.backends.nnpack.flags(enabled=False):
        for index, node in enumerate(nodes):
            for v in node.inputs:
                first_use.setdefault(v.name, index)
            outs = path_rule(node)(it, node, [_unpack(forward[v.name], dtype) for v in node.inputs])
            for v, t in zip(node.outputs, outs):
                forward[v.name] = t > 0 if t.is_floating_point() else t  # counts >= 0: kept as booleans (1 byte)
            if on_node is not None:
                on_node()
    backward: dict[str, Any] = {}
    for v in graph.outputs:
        backward[v.name] = backward.get(v.name, 0) + torch.ones(forward[v.name].shape, dtype=dtype)
    reached = {name: np.zeros(p.shape, dtype=bool) for name, p in params.items()}
    graph_inputs = set(inputs)
    with torch.enable_grad(), torch.backends.nnpack.flags(enabled=False):
        for index in range(len(nodes) - 1, -1, -1):
            node = nodes[index]
            cotangents = [backward.pop(v.name, None) for v in node.outputs]
            if live is not None:
                for v, g in zip(node.outputs, cotangents):
                    if v.name not in first_use:  # no consumer left to add to its cotangent
                        _count_live(live, v.name, forward.get(v.name), g)
            if any(g is not None and bool(g.any()) for g in cotangents):
                _node_vjp(it, node, forward, cotangents, graph_inputs, params, reached, backward, dtype)
            for v in node.inputs:
                if first_use.get(v.name) == index and v.name in forward:
                    if live is not None:  # every consumer has run: the cotangent is complete
                        _count_live(live, v.name, forward[v.name], backward.get(v.name))
                    forward.pop(v.name)
            if on_node is not None:
                on_node()
    return reached


def _count_live(live: dict[str, tuple[int, int]], name: str, reached: Any, cotangent: Any) -> None:
    """Record (elements reached forward with a nonzero cotangent, numel) of a boolean indicator."""
    import torch  # heavy optional dependency

    if reached is None or reached.dtype != torch.bool:
        return
    if cotangent is None:
        live[name] = (0, reached.numel())
        return
    live[name] = (int((reached & (cotangent != 0)).sum()), reached.numel())


def _node_vjp(it: Any, node: Node, forward: dict[str, Any], cotangents: list[Any], graph_inputs: set[str],
              params: dict[str, Param], reached: dict[str, np.ndarray], backward: dict[str, Any], dtype: Any) -> None:
    """Re-run ``node`` with autograd; add its input cotangents to ``backward``, OR its weight grads > 0 into ``reached``."""
    import torch  # heavy optional dependency

    if _pass_through(node, forward, cotangents, graph_inputs, backward):
        return
    args = [_unpack(forward[v.name], dtype) for v in node.inputs]
    args = [a if v.name in graph_inputs or not a.is_floating_point() else a.requires_grad_() for v, a in zip(node.inputs, args)]
    # the interpreter's own paths-mode operand (mask, or ones), fresh: it.weights is empty here
    leaves = {p.name: it.weight(p).requires_grad_() for p in node.params.values() if p.name in params}
    it.weights = leaves
    try:
        outs = path_rule(node)(it, node, args)
    finally:
        it.weights = {}
    pairs = [(t, g.sign()) for t, g in zip(outs, cotangents) if g is not None and t.requires_grad]
    targets = [a for a in args if a.requires_grad] + list(leaves.values())
    if not pairs or not targets:
        return
    # VJP through a scalar: grad_outputs= would import torch.fx's symbolic shapes (~1 s)
    got = torch.autograd.grad(sum((t * g).sum() for t, g in pairs), targets, allow_unused=True)
    grad_inputs = [v for v, a in zip(node.inputs, args) if a.requires_grad]
    for v, g in zip(grad_inputs, got[: len(grad_inputs)]):
        if g is not None:
            backward[v.name] = backward[v.name] + g if v.name in backward else g
    for name, g in zip(leaves, got[len(grad_inputs):]):
        if g is not None:
            reached[name] |= (g > 0).numpy()


def _pass_through(node: Node, forward: dict[str, Any], cotangents: list[Any], graph_inputs: set[str], backward: dict[str, Any]) -> bool:
    """The VJP of an identity path rule (norm, activation, softmax) without autograd: its input's
    cotangent gains the output's, ``sign(g)``, exactly what autograd gives. False (autograd does
    it) when the rule is another, broadcasts, or the input is not a 0/1 indicator."""
    import torch  # heavy optional dependency

    from pai_compiler.interp_path_rules import path_identity  # imports torch

    if len(node.inputs) != 1 or len(cotangents) != 1 or path_rule(node) is not path_identity:
        return False
    v, g = node.inputs[0], cotangents[0]
    x = forward.get(v.name)
    if x is None or g is None or v.name in graph_inputs or x.dtype != torch.bool or tuple(x.shape) != tuple(g.shape):
        return False
    step = g.sign()
    backward[v.name] = backward[v.name] + step if v.name in backward else step
    return True


def _unpack(t: torch.Tensor, dtype: Any) -> torch.Tensor:
    """A stored indicator as a 0/1 operand (booleans become ``dtype``; others pass through)."""
    import torch  # heavy optional dependency

    return t.to(dtype, memory_format=torch.contiguous_format) if t.dtype == torch.bool else t


def _indicator_dtype() -> Any:
    """bfloat16 where the CPU has native bf16 GEMM (≈2× faster), else float32.

    Both are exact here: every path rule sums non-negative products of 0/1 values, so a true 0
    is computed as exactly 0 and a true count ≥ 1 stays positive (≥ 1 - 2⁻⁸) whatever the
    rounding or summation order; ``sign`` is therefore the exact reachability indicator.
    """
    import torch  # heavy optional dependency

    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:  # older torch
        native = False
    return torch.bfloat16 if native else torch.float32
