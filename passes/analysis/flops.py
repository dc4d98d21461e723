"""Symbolic MAC counts: MACs(node) = fixed(node) + Σ_W sites(node, W) · count(W), over the IR's dims.

``count(W)`` is ``numel(W)`` for **dense** MACs, the kept weights for **nonzero** MACs, and the
effective weights (kept and on an input->output path, from ``node-path``) for **effective**
MACs, i.e. what survives dead-node elimination. One MAC is one multiply-accumulate; FLOPs =
2 × MACs for conv, transposed conv, linear and matmul (the ``FlopCounterMode`` convention), nowhere else.

Rules (``MAC_RULES``, keyed by OpKind; N = batch, numel = product of a value's dims):

=============  ========================================================================
conv           sites = N · ∏ out_spatial per weight: dense = N·∏out·Cout·(Cin/groups)·∏k.
               Every tap counts, padded ones too (as FlopCounterMode/fvcore do), so
               nonzero = N · ∏ out_spatial · nnz(mask) exactly.
deconv         sites = N · ∏ in_spatial per weight (conv_transpose): dense = N·∏in·Cin·(Cout/groups)·∏k
               (each input pixel scatters through every tap, cropped ones too, as
               FlopCounterMode counts it); nonzero = N · ∏ in_spatial · nnz(mask).
linear         sites = ∏ batch dims of the input (all but the last): dense = ∏batch·out·in,
               nonzero = ∏batch · nnz(mask).
matmul         two activations: numel(out) · K (K = last dim of the first operand).
attention      fused MHA, output (…, L, E): Σ projections ∏(…, L) · numel(W), plus the
               score and value products 2 · ∏(…, L) · L_kv · E.
norm           numel(input): 1 MAC per element (batch and layer norm alike).
pointwise      numel(out); softmax numel(out); add/mul numel(out).
pool           windowed: numel(out) · ∏kernel; reduce (global pool, ReduceMean…): numel(in).
others         input, output, constant, reshape, concat, split: 0.
embedding      an embedding lookup (opaque, ``op="embedding"``): 0 (data movement); a tensor
               computed from sizes (``op="shape_data"``) or a gather by run-time indices: 0;
               a select (``op="where"``): numel(out); a resize (``op="resize"``): nearest 0
               (a gather), linear numel(out) · 2^(spatial axes).
opaque         0, with a warning (and so is any node whose output shape is unknown).
=============  ========================================================================

Weight-free elementwise nodes (norm, pointwise, softmax, add, mul, pool) count the same dense
and nonzero; their **effective** MACs count only the elements on an input->output path (what
dead-node elimination keeps), ``MACs · live/numel`` of the value the rule counts (the input
for norm and reduce-pool, else the output), with live/numel measured by ``node-path`` at its
sample binding (rounded down where another binding makes it fractional). So a compact model's
nonzero MACs are ≥ the masked model's effective MACs (equal for CNNs with whole kernels and a
global-pool head): compaction keeps whole channels, a superset of the live elements, plus one
MAC per element of any folded bias map. Matmul and attention (pinned whole by compaction)
count the same in all three columns.
A model exported with a static batch
B > 1 (every input and output leads with B) is counted per sample: each count is divided by B
and multiplied by the symbol ``batch`` (unbound = 1; ``--bind batch=N`` counts N samples), so
batch-1, symbolic-batch and static-batch exports of one network report the same MACs.
``FlopsResult.by_kind`` splits the dense total by kind (conv, conv_transpose, linear, matmul, attention, norm,
pointwise, softmax, pool, add, mul): conv + conv_transpose + linear + matmul (+ attention) is what torch's
``FlopCounterMode`` counts (its FLOPs are 2 × these MACs); the other kinds it leaves out. Dense and nonzero counts need neither
torch nor a path analysis (``flops{effective=false}``); evaluation binds each symbol by name
(default 1), e.g. ``{"batch": 32, "seq": 197}``. Counts are ints (and exact fractions for
live-scaled effective MACs) on a static model, sympy expressions only where a dim is symbolic:
a static model's audit never imports sympy.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import TYPE_CHECKING, ClassVar, NamedTuple, Union

from pai_compiler.errors import PaicError
from pai_compiler.ir import Dim, Graph, Node, OpKind, Param
from pai_compiler.ir.dims import as_expr, dim_symbol, sym
from pai_compiler.pass_infra import AnalysisManager, AnalysisPass
from pai_compiler.passes.analysis.bindings import static_batch
from pai_compiler.passes.analysis.node_path import NodePathPass

if TYPE_CHECKING:
    import sympy

#: a MAC count's value: an int, an exact fraction (live-scaled effective MACs) or a sympy expression
MacValue = Union[int, Fraction, "sympy.Expr"]

__all__ = ["FlopsPass", "FlopsResult", "NodeMacs", "MacCount", "MacValue", "MAC_RULES", "evaluate", "mac_kind", "EFFECTIVE_FALLBACK", "BATCH_SYMBOL"]

#: the symbol a static batch becomes (MACs per sample unless bound)
BATCH_SYMBOL = "batch"

EFFECTIVE_FALLBACK = "flops: effective MACs equal nonzero MACs"


class MacCount(NamedTuple):
    """``fixed`` MACs plus ``sites`` MACs per counted weight of each Param."""

    fixed: Dim
    weighted: tuple[tuple[Param, Dim], ...] = ()
    warning: str | None = None


def _prod(dims: tuple[Dim, ...] | list[Dim]) -> Dim:
    out: Dim = 1
    for d in dims:
        out = out * d
    return out


def _known(node: Node, rule: Callable[[Node], MacCount]) -> MacCount:
    if any(v.shape is None for v in (*node.inputs, *node.outputs)):
        return MacCount(0, (), f"node {node.name!r} ({node.kind.value}): unknown shape, counted as 0 MACs")
    return rule(node)


def _conv(node: Node) -> MacCount:
    out = node.outputs[0].shape
    assert out is not None
    return MacCount(0, ((node.params["weight"], out[0] * _prod(out[2:])),))


def _conv_transpose(node: Node) -> MacCount:
    """Every input position meets every weight once: sites = N · ∏ in_spatial."""
    x = node.inputs[0].shape
    assert x is not None
    return MacCount(0, ((node.params["weight"], x[0] * _prod(x[2:])),))


def _linear(node: Node) -> MacCount:
    shape = node.inputs[0].shape
    assert shape is not None
    return MacCount(0, ((node.params["weight"], _prod(shape[:-1])),))


def _matmul(node: Node) -> MacCount:
    a, out = node.inputs[0].shape, node.outputs[0].shape
    assert a is not None and out is not None
    return MacCount(_prod(out) * a[-1])


def _attention(node: Node) -> MacCount:
    out = node.outputs[0].shape
    assert out is not None
    seq_axis = -2 if node.attrs.get("batch_first", True) else 0
    kv = node.inputs[1].shape if len(node.inputs) > 1 and node.inputs[1].shape is not None else out
    tokens = _prod(out[:-1])
    weights = tuple((p, tokens) for p in node.params.values() if p.data.ndim == 2)
    return MacCount(2 * tokens * kv[seq_axis] * out[-1], weights)


def _numel_out(node: Node) -> MacCount:
    return MacCount(_prod(node.outputs[0].shape or ()))


def _numel_in(node: Node) -> MacCount:
    return MacCount(_prod(node.inputs[0].shape or ()))


def _pool(node: Node) -> MacCount:
    if node.attrs.get("reduce"):
        return _numel_in(node)
    return MacCount(_prod(node.outputs[0].shape or ()) * math.prod(node.attrs["kernel_shape"]))


def _zero(node: Node) -> MacCount:
    return MacCount(0)


def _opaque(node: Node) -> MacCount:
    if node.attrs.get("op") in ("embedding", "shape_data", "gather"):  # lookups, gathers, tensors computed from sizes: no MACs
        return MacCount(0)
    if node.attrs.get("op") == "where" and node.outputs[0].shape is not None:  # a select: one op per element, like a pointwise op
        return _numel_out(node)
    if node.attrs.get("op") == "resize" and node.outputs[0].shape is not None:  # nearest: a gather; linear: 2 reads per spatial axis
        return MacCount(0) if node.attrs["mode"] == "nearest" else MacCount(_prod(node.outputs[0].shape) * 2 ** (len(node.outputs[0].shape) - 2))
    op = node.attrs.get("op_type", "?")
    return MacCount(0, (), f"node {node.name!r} is opaque ({op}): its MACs are unknown and counted as 0")


MAC_RULES: dict[OpKind, Callable[[Node], MacCount]] = {
    OpKind.CONV: _conv,
    OpKind.CONV_TRANSPOSE: _conv_transpose,
    OpKind.LINEAR: _linear,
    OpKind.MATMUL: _matmul,
    OpKind.ATTENTION: _attention,
    OpKind.NORM: _numel_in,
    OpKind.POINTWISE: _numel_out,
    OpKind.SOFTMAX: _numel_out,
    OpKind.ADD: _numel_out,
    OpKind.MUL: _numel_out,
    OpKind.POOL: _pool,
    OpKind.INPUT: _zero,
    OpKind.OUTPUT: _zero,
    OpKind.CONSTANT: _zero,
    OpKind.RESHAPE: _zero,
    OpKind.CONCAT: _zero,
    OpKind.SPLIT: _zero,
}


def mac_kind(node: Node) -> str:
    """The MAC family of a node for ``by_kind``: its OpKind, a select (opaque ``where``) as pointwise."""
    if node.kind is OpKind.OPAQUE and node.attrs.get("op") == "where":
        return OpKind.POINTWISE.value
    return node.kind.value


@dataclass(frozen=True)
class NodeMacs:
    node: str
    kind: str
    dense: MacValue
    nonzero: MacValue
    effective: MacValue | None
    mac_kind: str = ""


@dataclass(frozen=True)
class FlopsResult:
    nodes: tuple[NodeMacs, ...]
    dense: MacValue
    nonzero: MacValue
    effective: MacValue | None
    warnings: tuple[str, ...] = ()
    _index: dict[str, NodeMacs] = field(default_factory=dict, repr=False, compare=False)

    def node(self, name: str) -> NodeMacs:
        if not self._index:
            self._index.update((n.node, n) for n in self.nodes)
        return self._index[name]

    def by_kind(self, bind: Mapping[str, int] | None = None) -> dict[str, int]:
        """Dense MACs per kind (``mac_kind``) at ``bind``, kinds with no MACs left out, sorted by name."""
        totals: dict[str, int] = {}
        for record in self.nodes:
            value = evaluate(record.dense, bind)
            if value:
                key = record.mac_kind or record.kind
                totals[key] = totals.get(key, 0) + value
        return dict(sorted(totals.items()))

    def evaluate(self, bind: Mapping[str, int] | None = None) -> dict[str, int | None]:
        """Total dense / nonzero / effective MACs at ``bind`` (unbound symbols = 1)."""
        return {
            "dense": evaluate(self.dense, bind),
            "nonzero": evaluate(self.nonzero, bind),
            "effective": None if self.effective is None else evaluate(self.effective, bind),
        }


def evaluate(expr: MacValue, bind: Mapping[str, int] | None = None) -> int:
    """An integer MAC count (rounded down) from a count; every unbound symbol is 1."""
    if isinstance(expr, int):
        return expr
    if isinstance(expr, Fraction):  # live fractions of effective MACs (see the docstring)
        return math.floor(expr)
    return _evaluate(expr, tuple(sorted((bind or {}).items())))


@lru_cache(maxsize=65536)
def _evaluate(expr: sympy.Expr, bind: tuple[tuple[str, int], ...]) -> int:
    if expr.is_Integer:
        return int(expr)
    values = dict(bind)
    value = expr.xreplace({s: sym().Integer(values.get(s.name, 1)) for s in expr.free_symbols})
    if value.is_Rational and not value.is_Integer:  # live fractions of effective MACs (see the docstring)
        return int(sym().floor(value))
    if not value.is_Integer:
        raise PaicError(f"MAC count {expr} does not evaluate to an integer at {values} (got {value})")
    return int(value)


@dataclass(frozen=True)
class FlopsPass(AnalysisPass[FlopsResult]):
    """Dense, nonzero and effective MACs per node and in total (ints, or sympy expressions over symbolic dims).

    ``effective=false`` skips the path analysis (and torch); ``bind`` is handed to the
    ``node-path`` analysis it uses (its non-batch dims); the MACs themselves stay symbolic.
    """

    name: ClassVar[str] = "flops"
    effective: bool = True
    bind: str = ""

    def run(self, graph: Graph, am: AnalysisManager) -> FlopsResult:
        warnings: list[str] = []
        counts = self._effective_counts(graph, am, warnings) if self.effective else None
        batch = static_batch(graph)
        per_sample = (lambda x: as_expr(x) * dim_symbol(BATCH_SYMBOL) / batch) if batch > 1 else (lambda x: x)  # noqa: E731
        records: list[NodeMacs] = []
        for node in graph.nodes:
            rule = MAC_RULES.get(node.kind, _opaque)
            mac = _known(node, rule) if node.kind is not OpKind.OPAQUE else rule(node)
            if mac.warning:
                warnings.append(mac.warning)
            dense: Dim = mac.fixed
            nonzero: Dim = mac.fixed
            effective: Dim = counts.scale(node, mac.fixed) if counts is not None else mac.fixed
            for param, sites in mac.weighted:
                dense += sites * param.numel
                nonzero += sites * param.kept()
                if counts is not None:
                    effective += sites * counts.get(param.name, param.kept())
            records.append(NodeMacs(node.name, node.kind.value, per_sample(dense), per_sample(nonzero),
                                    per_sample(effective) if counts is not None else None, mac_kind(node)))
        total = lambda key: sum((getattr(r, key) for r in records), 0)  # noqa: E731
        return FlopsResult(tuple(records), total("dense"), total("nonzero"), total("effective") if counts is not None else None, tuple(warnings))

    def _effective_counts(self, graph: Graph, am: AnalysisManager, warnings: list[str]) -> _Effective:
        try:
            paths = am.get(NodePathPass(bind=self.bind))
        except PaicError as exc:
            warnings.append(f"{EFFECTIVE_FALLBACK} because the path analysis failed: {exc}")
            return _Effective({p.name: p.kept() for p in graph.prunable_params()}, {})
        return _Effective({row.param: row.effective_params for row in paths.layers}, paths.live_elements)


class _Effective(NamedTuple):
    """Effective weights per Param, and (live, numel) per value from node-path."""

    weights: dict[str, int]
    live: dict[str, tuple[int, int]]

    def get(self, key: str, default: int) -> int:
        return self.weights.get(key, default)

    def scale(self, node: Node, macs: Dim) -> MacValue:
        """A weight-free node's MACs restricted to the live elements of the value it counts."""
        if node.kind not in _LIVE_SCALED or not node.inputs or not node.outputs:
            return macs
        counted = node.inputs[0] if node.kind is OpKind.NORM or (node.kind is OpKind.POOL and node.attrs.get("reduce")) else node.outputs[0]
        live, numel = self.live.get(counted.name, (1, 1))
        if live >= numel or numel == 0:
            return macs
        return macs * Fraction(live, numel)


_LIVE_SCALED = frozenset({OpKind.NORM, OpKind.POINTWISE, OpKind.SOFTMAX, OpKind.ADD, OpKind.MUL, OpKind.POOL})
