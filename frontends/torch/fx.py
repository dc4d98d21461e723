"""torch.fx frontend: an ``nn.Module`` + example input -> paic IR (same IR as the ONNX frontend).

``torch.fx.symbolic_trace`` gives the call graph; ``ShapeProp`` runs it twice, at the example
batch ``b`` and at ``b + 1``, and every dimension is fitted as ``a*batch + c`` (``batch`` =
``sympy.Symbol("batch", integer=True, positive=True)``), so shapes carry the symbolic batch
exactly as an ONNX model with a dynamic batch does. Known leaf modules (Conv, Linear, norms,
activations, pooling, Flatten, Dropout, Identity) and functions/methods (add, mul, cat,
reshape, permute, getitem, ...) lower through the rule tables of ``ops`` into
``lowering.TorchLowering``, the builder that ``export`` shares; ``nn.MultiheadAttention`` becomes one ``attention`` node whose
``in_proj_weight`` (rows = 3*dim: q, k, v) and ``out_proj.weight`` are prunable (the DPaI
reference never pruned ``in_proj``: pass ``prune_in_proj=False``); ``nn.Embedding`` and
``F.embedding`` become an embedding lookup (``TorchLowering.embedding``). Every Param keeps its
parameter FQN in ``name`` and ``origin``; ``graph.meta["torch_module"]`` holds the module
(a ``ModuleHandle``, shared by ``Graph.clone`` and never serialised) for the torch backend.
Unknown operations become ``opaque`` nodes with a warning.
"""
from __future__ import annotations

import contextlib
import inspect
import io
from typing import Any

import sympy
import torch
from torch import nn

from pai_compiler.errors import ModelError
from pai_compiler.frontends.torch.lowering import TorchLowering
from pai_compiler.frontends.torch.operands import BATCH, Example, TorchConst, dtype_name, fold_at_batch, normalize_example, perm_of
from pai_compiler.frontends.torch.ops import FUNCTION_RULES, MODULE_RULES
from pai_compiler.ir import Dim, Graph, Value

__all__ = ["lower_fx", "EXPORT_HINT"]

EXPORT_HINT = " (try --frontend export)"  # torch.export handles data-dependent Python that fx cannot trace


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # a torch.nn container without a rule (nn.TransformerEncoderLayer) is traced through: its
        # submodules and functional calls have rules, while as a leaf it would be one opaque node
        if type(m) in MODULE_RULES:
            return True
        return super().is_leaf_module(m, qualname) and next(m.children(), None) is None


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
            out[n.name] = torch.utils._pytree.tree_map(lambda t: _Meta(tuple(t.shape), dtype_name(t)) if isinstance(t, torch.Tensor) else t, result)
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


def lower_fx(module: nn.Module, example: Any, *, name: str | None = None, prune_in_proj: bool = True, prune_tied: bool = False) -> Graph:
    """Trace ``module`` with torch.fx and lower it; ``example`` is a tensor, tuple, dict (keyword inputs) or shape.

    Dim 0 of every input is the batch (symbolic in the IR); arguments the example does not give
    keep their defaults (traced as constants); the module is evaluated in eval mode and its
    training flag restored.
    """
    call = normalize_example(example)
    feed, concrete = _feed(module, call)
    b1 = call.batch
    feed2 = [torch.cat([t, t[:1]], 0) if isinstance(t, torch.Tensor) and t.dim() else t for t in feed]
    was_training = module.training
    module.eval()
    try:
        try:
            graph = _Tracer().trace(module, concrete_args=concrete or None)
        except Exception as exc:
            msg = " ".join(str(exc).split())[:300]
            raise ModelError(f"torch.fx cannot trace {type(module).__name__}: {type(exc).__name__}: {msg}{EXPORT_HINT}") from exc
        gm = torch.fx.GraphModule(module, graph)
        try:
            run1, run2 = _record(gm, tuple(feed)), _record(gm, tuple(feed2))
        except Exception as exc:
            msg = " ".join(str(exc).split())[:300]
            raise ModelError(f"{type(module).__name__} fails on the example input: {type(exc).__name__}: {msg}") from exc
        metas = {k: _fit(run1[k], run2[k], b1, b1 + 1, k) for k in run1}
        lowering = TorchLowering(module, name or type(module).__name__, "fx", prune_in_proj=prune_in_proj, prune_tied=prune_tied)
        _FxWalker(lowering, gm, metas, b1).run()
        return lowering.finish(call.tensors)
    finally:
        module.train(was_training)


def _feed(module: nn.Module, call: Example) -> tuple[list[Any], dict[str, Any]]:
    """The traced forward's arguments in signature order, and the defaults of those the example leaves out."""
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    if not call.keywords and len(params) <= len(call.positional):
        return list(call.positional), {}
    names = [p.name for p in params]
    unknown = [k for k in call.keywords if k not in names]
    if unknown:
        raise ModelError(f"example input {unknown[0]!r}: {type(module).__name__}.forward has no such argument (it takes {', '.join(names)})")
    feed: list[Any] = []
    concrete: dict[str, Any] = {}
    for i, p in enumerate(params):
        if i < len(call.positional):
            feed.append(call.positional[i])
        elif p.name in call.keywords:
            feed.append(call.keywords[p.name])
        elif p.default is not p.empty:
            feed.append(p.default)
            concrete[p.name] = p.default
        else:
            raise ModelError(f"{type(module).__name__}.forward needs argument {p.name!r}: give it in the example input")
    return feed, concrete


class _FxWalker:
    def __init__(self, lw: TorchLowering, gm: torch.fx.GraphModule, metas: dict[str, Any], example_batch: int) -> None:
        self.lw, self.gm, self.metas, self.example_batch = lw, gm, metas, example_batch
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
                # a non-tensor argument is a default the example left out, traced as a constant
                self.env[n.name] = self.lw.add_input(n.name, m.shape, m.dtype) if isinstance(m, _Meta) else m
            elif n.op == "get_attr":
                t = _get_attr(self.gm, n.target)
                self.env[n.name] = TorchConst(t, n.target) if isinstance(t, torch.Tensor) else t
            elif n.op == "output":
                for leaf in torch.utils._pytree.tree_leaves(self.load(n.args[0])):
                    if leaf is None:
                        continue  # an absent optional output (ModelOutput fields, None in a tuple)
                    self.lw.add_output(leaf, outputs)
                    outputs += 1
            else:
                self.env[n.name] = self.visit(n)

    def visit(self, n: torch.fx.Node) -> Any:
        args, kwargs = self.load(n.args), self.load(n.kwargs)
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        module_rules, function_rules = MODULE_RULES, FUNCTION_RULES
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
            perm = perm_of(n.target, rank, args[1:])
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
        plain = torch.utils._pytree.tree_map(lambda a: a.value if isinstance(a, TorchConst) and a.broadcast_to is None and a.varies_at_batch is None else a, (args, kwargs))
        leaves = torch.utils._pytree.tree_leaves(plain)
        size_arithmetic = n.op == "call_function" and getattr(n.target, "__module__", None) in ("_operator", "operator", "builtins")
        if any(isinstance(a, TorchConst) for a in leaves) or (any(isinstance(a, sympy.Basic) for a in leaves) and not size_arithmetic):
            return fold_at_batch(n.name, self._callable(n), plain, self.example_batch, self._meta_shape(n))
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


    def _callable(self, n: torch.fx.Node) -> Any:
        if n.op == "call_function":
            return n.target
        if n.op == "call_method":
            return lambda obj, *a, **k: getattr(obj, n.target)(*a, **k)
        return self.gm.get_submodule(n.target)

    def _meta_shape(self, n: torch.fx.Node) -> Any:
        m = self.metas.get(n.name)
        return m.shape if isinstance(m, _Meta) else None


def _get_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
