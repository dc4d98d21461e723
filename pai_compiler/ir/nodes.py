"""The IR's node types: ``OpKind`` (the closed operator set), ``Param`` (a weight and its mask),
``Value`` (an SSA edge with a possibly symbolic shape) and ``Node`` (an operation).

Nodes are built and linked only through :class:`~pai_compiler.ir.core.Graph`, which keeps the
use-lists consistent. A ``Param``'s mask is bool with the weight's shape (``None`` = dense).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from pai_compiler.errors import VerificationError

__all__ = ["OpKind", "Dim", "Param", "Value", "Node", "WEIGHTED_KINDS", "verify_node_params"]

if TYPE_CHECKING:
    import sympy

#: an int, or a sympy expression over positive-integer symbols (``pai_compiler.ir.dims``)
Dim = Union[int, "sympy.Expr"]


class OpKind(StrEnum):
    """The closed set of operator kinds the analyses understand (plus ``opaque``)."""

    INPUT = "input"
    OUTPUT = "output"
    CONSTANT = "constant"  # a data constant used as an operand (class token, positions)
    CONV = "conv"
    CONV_TRANSPOSE = "conv_transpose"  # weight (in, out/groups, k...): out_axis=1, in_axis=0
    LINEAR = "linear"  # activation x constant weight, over the last axis
    MATMUL = "matmul"  # two activations (attention Q.K^T, A.V)
    ADD = "add"  # two or more activations summed (residual); attrs["op"] in add/sub
    MUL = "mul"  # two activations multiplied (gating)
    CONCAT = "concat"
    SPLIT = "split"
    NORM = "norm"
    POINTWISE = "pointwise"  # unary, shape-preserving up to broadcasting with a constant
    POOL = "pool"
    SOFTMAX = "softmax"
    RESHAPE = "reshape"  # pure data movement: reshape, flatten, transpose, slice, gather...
    ATTENTION = "attention"  # a fused multi-head attention (torch frontends)
    OPAQUE = "opaque"


WEIGHTED_KINDS = frozenset({OpKind.CONV, OpKind.CONV_TRANSPOSE, OpKind.LINEAR, OpKind.ATTENTION})


@dataclass(eq=False)
class Param:
    """A weight tensor. ``out_axis``/``in_axis`` say which axes are output/input channels."""

    name: str
    data: np.ndarray
    prunable: bool = False
    out_axis: int = 0
    in_axis: int | None = 1
    origin: str = ""
    _mask: np.ndarray | None = field(default=None, repr=False)
    #: one use's copy of a constant that an exporter de-duplicated (equal BN stats, zeros,
    #: biases stored once): not a tie, so its storage is itself, not the shared ``origin``
    per_use_copy: bool = False

    @property
    def mask(self) -> np.ndarray | None:
        return self._mask

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.data.shape)

    @property
    def storage(self) -> object:
        """Which stored tensor this is: its ``origin``, or the Param itself when it has none or
        is a per-use copy of a de-duplicated constant.

        Params of one weight read in two layouts share an origin (``frontends/params.py``);
        passes that edit weights treat them as one shared tensor (a tie)."""
        return self if self.per_use_copy else (self.origin or self)

    @property
    def numel(self) -> int:
        return int(self.data.size)

    def kept(self) -> int:
        """Number of weights the mask keeps (all of them when dense)."""
        return self.numel if self._mask is None else int(np.count_nonzero(self._mask))

    def mask_or_ones(self) -> np.ndarray:
        return np.ones(self.data.shape, dtype=bool) if self._mask is None else self._mask

    def to_oi(self, array: np.ndarray) -> np.ndarray:
        """View ``array`` (weight-shaped) with axes ordered (out, in, rest...)."""
        axes = [self.out_axis]
        if self.in_axis is not None:
            axes.append(self.in_axis)
        rest = [a for a in range(array.ndim) if a not in axes]
        return np.transpose(array, axes + rest)

    def from_oi(self, array: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_oi`."""
        axes = [self.out_axis] + ([self.in_axis] if self.in_axis is not None else [])
        order = axes + [a for a in range(array.ndim) if a not in axes]
        return np.transpose(array, np.argsort(order))


@dataclass(eq=False)
class Value:
    """An SSA edge: produced by one node, used by any number of nodes."""

    name: str
    shape: tuple[Dim, ...] | None
    dtype: str = "float32"
    producer: Node | None = field(default=None, repr=False)
    uses: list[Node] = field(default_factory=list, repr=False)

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)


@dataclass(eq=False)
class Node:
    """An operation. Construct through :meth:`Graph.add_node`, never directly."""

    kind: OpKind
    name: str
    inputs: tuple[Value, ...]
    outputs: tuple[Value, ...]
    params: dict[str, Param] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    origin: str = ""

    @property
    def weight(self) -> Param | None:
        return self.params.get("weight")

    def __repr__(self) -> str:  # short: nodes are linked in both directions
        return f"Node({self.kind.value} {self.name!r})"


def verify_node_params(n: Node) -> None:
    """A node's own invariants: bool masks of the weight's shape, in/out axes apart, conv groups dividing the outputs."""
    for key, p in n.params.items():
        if p.mask is not None and (p.mask.shape != p.data.shape or p.mask.dtype != np.bool_):
            raise VerificationError(f"{n.name!r}.{key}: mask must be bool with the weight's shape")
        if p.prunable and p.in_axis is not None and p.in_axis == p.out_axis:
            raise VerificationError(f"{n.name!r}.{key}: in_axis equals out_axis")
    w = n.params.get("weight")
    if n.kind is OpKind.CONV and w is not None:
        groups = int(n.attrs.get("groups", 1))
        if w.data.ndim < 3:
            raise VerificationError(f"conv {n.name!r}: weight rank {w.data.ndim} < 3")
        if w.shape[0] % groups:
            raise VerificationError(f"conv {n.name!r}: {w.shape[0]} output channels not divisible by groups={groups}")
    if n.kind is OpKind.CONV_TRANSPOSE and w is not None:
        groups = int(n.attrs.get("groups", 1))
        if w.data.ndim < 3 or w.out_axis != 1 or w.in_axis != 0:
            raise VerificationError(f"conv_transpose {n.name!r}: weight must be (in, out/groups, *kernel) with out_axis=1, in_axis=0")
        if w.shape[0] % groups:
            raise VerificationError(f"conv_transpose {n.name!r}: {w.shape[0]} input channels not divisible by groups={groups}")
