"""torch.export frontend: an ``nn.Module`` + example input -> paic IR at the ATen level.

``torch.export.export`` with a dynamic batch (``Dim("batch")`` on dim 0 of every input; an
example batch of 1 is widened to 2, since export specialises size-1 dims) gives an ATen graph
whose FakeTensor metadata carries symbolic shapes; the batch symbol becomes paic's
``batch``. Both the pre-dispatch form (aten.conv2d, linear, batch_norm, layer_norm, gelu,
scaled_dot_product_attention) and the decomposed core form (convolution, addmm/mm over a
transposed weight, ``_native_batch_norm_legit_no_training``, ``max_pool2d_with_indices``)
lower through the ``TorchLowering`` builder shared with the fx frontend. An
``nn.MultiheadAttention`` arrives decomposed: its ``in_proj_weight`` is an ordinary
``linear`` (prunable unless ``prune_in_proj=False``) and ``scaled_dot_product_attention``
becomes ``mul(scale), transpose, matmul, softmax, matmul`` (the ONNX exporter's spelling), with an
attention or causal mask added before the softmax. The example may be keyword inputs (a dict);
a model that takes ``use_cache`` is exported with ``use_cache=False`` (a key/value cache is an
output object, not the model's function). Constants whose size is the batch (position ids
expanded over it, ``arange(batch)`` in mask builders) are evaluated at the example batch
(``operands.fold_at_batch``). The per-op rules live in ``aten``.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import operator
import warnings
from collections.abc import Iterator
from typing import Any

import sympy
import torch
from torch import nn

from pai_compiler.errors import ModelError
from pai_compiler.frontends.torch.aten import ATEN_RULES, SafeSoftmaxGuard, Zeros
from pai_compiler.frontends.torch.lowering import TorchLowering
from pai_compiler.frontends.torch.operands import BATCH, Example, TorchConst, fold_at_batch, normalize_example, perm_of
from pai_compiler.ir import Dim, Graph, Value

__all__ = ["lower_export", "ATEN_RULES"]


@contextlib.contextmanager
def _export_context() -> Iterator[None]:
    backend = getattr(torch.backends, "mha", None)
    previous = backend.get_fastpath_enabled() if backend is not None else None
    try:
        if backend is not None:
            backend.set_fastpath_enabled(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if backend is not None and previous is not None:
            backend.set_fastpath_enabled(previous)


def lower_export(module: nn.Module, example: Any, *, name: str | None = None, prune_in_proj: bool = True,
                 decompose: bool = False, prune_tied: bool = False) -> Graph:
    """Export ``module`` with torch.export (dynamic batch) and lower the ATen graph.

    ``example`` is a tensor, a tuple (positional inputs), a dict (keyword inputs) or a shape;
    ``decompose=True`` lowers the core-ATen form (``ep.run_decompositions()``) instead.
    """
    call = normalize_example(example)
    wide = call.mapped(lambda t: t.repeat(2, *([1] * (t.dim() - 1))) if t.dim() and t.shape[0] == 1 else t)
    keywords: dict[str, Any] = dict(wide.keywords)
    if _accepts(module, "use_cache") and "use_cache" not in keywords:
        keywords["use_cache"] = False  # a key/value cache is an output object, not part of the model's function
    was_training = module.training
    module.eval()
    try:
        batch = torch.export.Dim("batch")
        try:
            with _export_context():
                ep = torch.export.export(module, wide.positional, kwargs=keywords, dynamic_shapes=_dynamic_shapes(module, wide, keywords, batch),
                                         strict=False)
                composite = _composite_ops(ep.graph)
                if decompose:
                    ep = ep.run_decompositions()
                elif composite or _writes_through_alias(ep.graph):
                    table = torch.export.default_decompositions()  # functionalizes too: in-place ops become functional
                    ep = ep.run_decompositions({op: table[op] for op in composite})
        except Exception as exc:
            msg = " ".join(str(exc).split())[:300]
            raise ModelError(f"torch.export cannot export {type(module).__name__}: {type(exc).__name__}: {msg}") from exc
        lowering = TorchLowering(module, name or type(module).__name__, "export", prune_in_proj=prune_in_proj, prune_tied=prune_tied)
        _ExportWalker(lowering, ep, module, wide.batch).run()
        return lowering.finish(call.tensors)
    finally:
        module.train(was_training)


def _accepts(module: nn.Module, argument: str) -> bool:
    try:
        return argument in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _composite_ops(graph: torch.fx.Graph) -> set[Any]:
    """The ops of ``graph`` that lower through torch's own decomposition (``einsum`` into permutes,
    views and ``bmm``: Funnel's attention; ``repeat_interleave`` of a count, ``pixel_shuffle`` into
    views, expands and permutes), each decomposed alone so the rest keeps its form."""
    aten = torch.ops.aten
    wanted = {aten.einsum.default, aten.repeat_interleave.self_int, aten.pixel_shuffle.default, aten.pixel_unshuffle.default, aten.im2col.default}
    return {n.target for n in graph.nodes if n.op == "call_function" and n.target in wanted}


def _writes_through_alias(graph: torch.fx.Graph) -> bool:
    """True when an in-place op writes into a view, an input, or a tensor that is read again
    (``shifted[:, 1:] = ids[:, :-1]``: ``copy_`` into a slice of ``shifted``). The walker reads an
    in-place op as its functional form, which is exact only when nothing else sees the write
    (``relu_`` on a conv's output); otherwise the program is functionalized first."""
    for n in graph.nodes:
        schema = getattr(n.target, "_schema", None)
        if n.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            x = n.args[i] if i < len(n.args) else n.kwargs.get(arg.name)
            if isinstance(x, torch.fx.Node) and (x.op == "placeholder" or len(x.users) > 1 or _is_view(x)):
                return True
    return False


def _is_view(n: torch.fx.Node) -> bool:
    """An ATen call whose result aliases its input without writing it (``slice``, ``select``, ``view``)."""
    schema = getattr(n.target, "_schema", None)
    alias = schema.returns[0].alias_info if schema is not None and schema.returns else None
    return alias is not None and not alias.is_write


def _dynamic_shapes(module: nn.Module, call: Example, keywords: dict[str, Any], batch: Any) -> Any:
    """Dim 0 of every tensor input is the batch: a tuple for positional calls, else a dict by argument name."""
    if not keywords:
        return tuple({0: batch} if t.dim() else None for t in call.positional)
    names = list(inspect.signature(module.forward).parameters)
    spec: dict[str, Any] = {names[i]: ({0: batch} if t.dim() else None) for i, t in enumerate(call.positional)}
    spec.update({k: ({0: batch} if isinstance(v, torch.Tensor) and v.dim() else None) for k, v in keywords.items()})
    return spec


def _bind(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Name every argument of an ATen call by its schema (defaults filled in)."""
    out: dict[str, Any] = {}
    for i, a in enumerate(target._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            out[a.name] = None
    return out


class _ExportWalker:
    def __init__(self, lw: TorchLowering, ep: Any, module: nn.Module, example_batch: int) -> None:
        self.lw, self.ep, self.module, self.example_batch = lw, ep, module, example_batch
        self.env: dict[str, Any] = {}
        self.symbols: dict[sympy.Symbol, Any] = {}

    # ---- shapes ------------------------------------------------------------------------
    def dim(self, d: Any) -> Dim:
        if isinstance(d, torch.SymInt):
            expr = sympy.sympify(d.node.expr).xreplace(self.symbols)
            if expr.free_symbols - {BATCH}:
                raise ModelError(f"torch.export produced a size {expr} that does not depend on the batch alone")
            return int(expr) if expr.is_Integer else sympy.expand(expr)
        return int(d)

    def meta_shape(self, val: Any) -> Any:
        if isinstance(val, torch.Tensor):
            return tuple(self.dim(d) for d in val.shape)
        if isinstance(val, (tuple, list)):
            return [self.meta_shape(v) for v in val]
        return None

    def shape(self, n: torch.fx.Node) -> tuple[Dim, ...]:
        s = self.meta_shape(n.meta.get("val"))
        if not isinstance(s, tuple):
            raise ModelError(f"{n.name}: expected a tensor result")
        return s

    def origin(self, n: torch.fx.Node) -> str:
        stack = n.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        return f"{path}:{n.name}" if path else n.name

    # ---- walk --------------------------------------------------------------------------
    def _tensor(self, target: str) -> torch.Tensor:
        with contextlib.suppress(AttributeError):
            return self.module.get_parameter(target)
        with contextlib.suppress(AttributeError):
            return self.module.get_buffer(target)
        if target in self.ep.state_dict:
            return self.ep.state_dict[target]
        return self.ep.constants[target]

    def run(self) -> None:
        from torch.export.graph_signature import InputKind

        specs = {s.arg.name: s for s in self.ep.graph_signature.input_specs}
        outputs = 0
        for n in self.ep.graph.nodes:
            if n.op == "placeholder":
                spec = specs[n.name]
                if spec.kind == InputKind.USER_INPUT:
                    val = n.meta.get("val")
                    if not isinstance(val, torch.Tensor):
                        self.env[n.name] = val  # a Python constant argument (use_cache=False), specialised by export
                        continue
                    if val.dim() and isinstance(val.shape[0], torch.SymInt):
                        self.symbols[sympy.sympify(val.shape[0].node.expr)] = BATCH
                    shape = self.shape(n)
                    self.env[n.name] = self.lw.add_input(n.name, shape, str(val.dtype).removeprefix("torch."))
                else:
                    self.env[n.name] = TorchConst(self._tensor(spec.target).detach(), spec.target)
            elif n.op == "output":
                for leaf in torch.utils._pytree.tree_leaves(self.load(n.args[0])):
                    if leaf is None:
                        continue  # an absent optional output
                    self.lw.add_output(leaf, outputs)
                    outputs += 1
            elif n.op == "call_function":
                self.env[n.name] = self.visit(n)
            else:
                raise ModelError(f"{n.name}: unexpected {n.op} node in an exported program")

    def load(self, a: Any) -> Any:
        return torch.fx.node.map_arg(a, lambda n: self.env[n.name])

    def visit(self, n: torch.fx.Node) -> Any:
        args, kwargs = self.load(n.args), self.load(n.kwargs)
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        has_value = any(isinstance(a, (Value, SafeSoftmaxGuard, Zeros)) for a in leaves)
        if n.target is operator.getitem:
            return args[0][args[1]]
        packet = str(getattr(n.target, "_overloadpacket", n.target)).removeprefix("aten.")
        if not has_value:
            if packet == "expand" and isinstance(args[0], TorchConst):
                return self.lw.expand(n.name, args[0], self.shape(n), self.origin(n))
            if packet in ("view", "reshape", "_unsafe_view") and isinstance(args[0], TorchConst) and args[0].broadcast_to is not None:
                c, out = args[0], self.shape(n)
                if c.broadcast_to == out:
                    return c  # core ATen spells x @ W as bmm(view(expand(x)), view(expand(W^T)))
                if (c.perm is None and c.tensor.dim() == len(c.broadcast_to) and c.tensor.shape[0] == 1 and out and out[0] == c.broadcast_to[0]
                        and all(isinstance(d, int) for d in (*out[1:], *c.broadcast_to[1:])) and c.tensor.numel() == math.prod(out[1:])):
                    return TorchConst(c.tensor.reshape(1, *out[1:]), broadcast_to=out)  # the batch axis stays leading: still a constant
                # the batch axis merged into others (Swin's window mask: (batch, nw, ...) -> (batch*nw, ...)):
                # no folded constant is right at every batch, so the reshape runs in the model
                return self.lw.reshape(n.name, self.lw.value(args[0], n.name), self.shape(n), self.origin(n))
            if packet == "repeat" and isinstance(args[0], TorchConst) and any(isinstance(r, sympy.Basic) for r in args[1]):
                return self._tile(n, args[0], list(args[1]))  # Bloom's alibi.repeat(batch, 1, 1)
            if packet in ("t", "permute", "transpose", "numpy_T") and isinstance(args[0], TorchConst) and args[0].broadcast_to is None and args[0].varies_at_batch is None:
                c = args[0]
                perm = perm_of({"numpy_T": "t"}.get(packet, packet), c.value.dim(), args[1:])
                base = c.perm or tuple(range(c.value.dim()))
                return TorchConst(c.tensor, c.fqn, tuple(base[p] for p in perm))
            return self.static(n, args, kwargs)
        rule = ATEN_RULES.get(packet)
        if rule is None or not hasattr(n.target, "_schema"):
            return self.lw.opaque(n.name, [a for a in leaves if isinstance(a, (Value, TorchConst))], self._shapes(n), str(n.target), f"ATen op {n.target} has no paic rule")
        return rule(self, n, _bind(n.target, args, kwargs))

    def _tile(self, n: torch.fx.Node, c: TorchConst, repeats: list[Any]) -> Value:
        """``c.repeat(*repeats)`` with a batch-sized count: each axis split in (count, size), expanded
        over the counts and merged back, which is right at every batch (a fold is right at one)."""
        x = self.lw.value(c, n.name)
        sizes = [1] * (len(repeats) - len(x.shape)) + list(x.shape)
        split = tuple(d for size in sizes for d in (1, size))
        tiled = tuple(d for count, size in zip(repeats, sizes) for d in (count, size))
        x = self.lw.reshape(f"{n.name}_split", x, split, self.origin(n))
        x = self.lw.expand(f"{n.name}_tile", x, tiled, self.origin(n))
        return self.lw.reshape(n.name, x, self.shape(n), self.origin(n))

    def _shapes(self, n: torch.fx.Node) -> list[Any]:
        s = self.meta_shape(n.meta.get("val"))
        return [s] if isinstance(s, tuple) else (list(s) if s else [None])

    def static(self, n: torch.fx.Node, args: Any, kwargs: Any) -> Any:
        """Evaluate a node whose operands are all compile-time; batch-dependent ones at the example batch."""
        plain = torch.utils._pytree.tree_map(lambda a: a.value if isinstance(a, TorchConst) and a.broadcast_to is None and a.varies_at_batch is None else a, (args, kwargs))
        leaves = torch.utils._pytree.tree_leaves(plain)
        symbolic = any(isinstance(a, sympy.Basic) for a in leaves)
        if symbolic and not isinstance(n.target, torch._ops.OpOverload):
            return n.target(*plain[0], **plain[1])  # size arithmetic (operator.mul on the batch)
        if symbolic or any(isinstance(a, TorchConst) for a in leaves):
            return fold_at_batch(n.name, n.target, plain, self.example_batch, self.meta_shape(n.meta.get("val")))
        try:
            result = n.target(*plain[0], **plain[1])
        except Exception as exc:
            raise ModelError(f"{n.name}: cannot evaluate {n.target} on constants ({type(exc).__name__}: {exc})") from None
        return TorchConst(result.detach()) if isinstance(result, torch.Tensor) else result
