"""The paic IR: a weighted-layer DAG of Nodes joined by Values, with prunable Params.

A ``Graph`` owns its nodes in topological order. Every mutation goes through a ``Graph``
method, which keeps use-lists consistent and bumps ``graph.version`` so cached analyses
know they are stale. Masks live on ``Param`` (bool, same shape as the weight; ``None`` =
dense), never as graph ops.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from pai_compiler.errors import VerificationError
# the node types are also read from here by .pt files pickled before they moved to ir.nodes
from pai_compiler.ir.nodes import Dim, Node, OpKind, Param, Value, verify_node_params

__all__ = ["Graph"]


class Graph:
    """A DAG of nodes in topological order. All mutation goes through its methods."""

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        self.version = 0
        self.meta: dict[str, Any] = {"warnings": []}
        self._nodes: list[Node] = []
        self._values: dict[str, Value] = {}
        self._node_names: set[str] = set()
        self._handed_out: set[str] = set()  # every fresh_name answer: a Param's name is in no other set

    # ---- reading -----------------------------------------------------------------------
    @property
    def nodes(self) -> tuple[Node, ...]:
        return tuple(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(tuple(self._nodes))

    def __len__(self) -> int:
        return len(self._nodes)

    @property
    def inputs(self) -> list[Value]:
        return [n.outputs[0] for n in self._nodes if n.kind is OpKind.INPUT]

    @property
    def outputs(self) -> list[Value]:
        return [n.inputs[0] for n in self._nodes if n.kind is OpKind.OUTPUT]

    def value(self, name: str) -> Value:
        return self._values[name]

    def node(self, name: str) -> Node:
        for n in self._nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def params(self) -> list[Param]:
        """Every distinct Param (a weight shared by two nodes appears once), in graph order."""
        seen: dict[int, Param] = {}
        for n in self._nodes:
            for p in n.params.values():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def prunable_params(self) -> list[Param]:
        return [p for p in self.params() if p.prunable]

    def layer_params(self) -> list[Param]:
        """The weights the audit counts as layers: every prunable Param, and a conv/linear weight
        kept dense because an embedding lookup reads the same tensor (an LM head tied to the token
        embedding). Such a head is a weight layer whose output channels are nodes however it is
        stored: the ONNX exporters' transposed copy of it is a plain prunable weight."""
        key = lambda p: p.storage if isinstance(p.storage, str) else id(p)  # noqa: E731
        tables = {key(p) for n in self._nodes if n.kind is OpKind.OPAQUE and n.attrs.get("op") == "embedding" for p in n.params.values()}
        layer_weights = {id(n.params["weight"]) for n in self._nodes if n.kind in (OpKind.CONV, OpKind.CONV_TRANSPOSE, OpKind.LINEAR) and "weight" in n.params}
        return [p for p in self.params() if p.prunable or (p.in_axis is not None and id(p) in layer_weights and key(p) in tables)]

    def layer_nodes(self) -> list[Node]:
        """Nodes holding at least one of :meth:`layer_params`, in order."""
        layers = {id(p) for p in self.layer_params()}
        return [n for n in self._nodes if any(id(p) in layers for p in n.params.values())]

    def weighted_nodes(self) -> list[Node]:
        """Nodes holding at least one prunable Param (conv, linear, attention), in order."""
        return [n for n in self._nodes if any(p.prunable for p in n.params.values())]

    def param_users(self, param: Param) -> list[Node]:
        return [n for n in self._nodes if any(p is param for p in n.params.values())]

    def fresh_name(self, base: str) -> str:
        """``base``, or ``base_N``: a name no value, node or earlier answer has (two constants folded
        with the same hint get distinct Param names, which every name-keyed weight table needs)."""
        name, i = base, 1
        while name in self._values or name in self._node_names or name in self._handed_out:
            name, i = f"{base}_{i}", i + 1
        self._handed_out.add(name)
        return name

    # ---- mutation ----------------------------------------------------------------------
    def _bump(self) -> None:
        self.version += 1

    def add_node(
        self,
        kind: OpKind,
        name: str,
        inputs: Iterable[Value] = (),
        outputs: Iterable[tuple[str, tuple[Dim, ...] | None, str]] = (),
        *,
        params: Mapping[str, Param] | None = None,
        attrs: Mapping[str, Any] | None = None,
        origin: str = "",
        before: Node | None = None,
    ) -> Node:
        """Create a node; ``outputs`` are (name, shape, dtype). Appended unless ``before``."""
        if name in self._node_names:
            raise VerificationError(f"duplicate node name {name!r}")
        ins = tuple(inputs)
        for v in ins:
            if self._values.get(v.name) is not v:
                raise VerificationError(f"node {name!r}: input {v.name!r} is not in the graph")
        outs = []
        for out_name, shape, dtype in outputs:
            if out_name in self._values:
                raise VerificationError(f"node {name!r}: value name {out_name!r} already exists")
            outs.append(Value(out_name, None if shape is None else tuple(shape), dtype))
        node = Node(OpKind(kind), name, ins, tuple(outs), dict(params or {}), dict(attrs or {}), origin)
        for v in outs:
            v.producer = node
            self._values[v.name] = v
        for v in ins:
            v.uses.append(node)
        if before is None:
            self._nodes.append(node)
        else:
            self._nodes.insert(self._nodes.index(before), node)
        self._node_names.add(name)
        self._bump()
        return node

    def remove_node(self, node: Node) -> None:
        """Remove a node whose outputs have no uses."""
        for v in node.outputs:
            if v.uses:
                raise VerificationError(f"cannot remove {node.name!r}: {v.name!r} is still used")
        for v in node.inputs:
            v.uses.remove(node)
        for v in node.outputs:
            del self._values[v.name]
        self._nodes.remove(node)
        self._node_names.discard(node.name)
        self._bump()

    def set_input(self, node: Node, index: int, value: Value) -> None:
        old = node.inputs[index]
        old.uses.remove(node)
        node.inputs = node.inputs[:index] + (value,) + node.inputs[index + 1 :]
        value.uses.append(node)
        self._bump()
        producer = value.producer
        if producer is not None and self._nodes.index(producer) > self._nodes.index(node):
            self.sort_topologically()  # keep the topological-order invariant (raises on a cycle)

    def replace_all_uses(self, old: Value, new: Value) -> None:
        for user in list(old.uses):
            for i, v in enumerate(user.inputs):
                if v is old:
                    self.set_input(user, i, new)

    def set_attr(self, node: Node, key: str, value: Any) -> None:
        node.attrs[key] = value
        self._bump()

    def set_shape(self, value: Value, shape: tuple[Dim, ...] | None) -> None:
        value.shape = None if shape is None else tuple(shape)
        self._bump()

    def set_mask(self, param: Param, mask: np.ndarray | None) -> None:
        """Attach a bool mask (same shape as the weight); ``None`` makes the param dense."""
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != param.data.shape:
                raise VerificationError(
                    f"mask for {param.name!r} has shape {mask.shape}, weight has {param.data.shape}"
                )
            mask = mask.astype(bool, copy=True)
        param._mask = mask
        self._bump()

    def set_param_data(self, param: Param, data: np.ndarray) -> None:
        if param._mask is not None and data.shape != param._mask.shape:
            raise VerificationError(f"new data for {param.name!r} does not match its mask shape")
        param.data = data
        self._bump()

    def replace_params(self, node: Node, params: Mapping[str, Param]) -> None:
        """Give ``node`` exactly ``params`` (keys left out are dropped); checked like ``verify``."""
        if node not in self._nodes:
            raise VerificationError(f"cannot replace params of {node.name!r}: it is not in the graph")
        old = node.params
        node.params = dict(params)
        try:
            verify_node_params(node)
        except VerificationError:
            node.params = old
            raise
        self._bump()

    def set_prunable(self, param: Param, prunable: bool) -> None:
        param.prunable = prunable
        if not prunable:
            param._mask = None
        self._bump()

    def sort_topologically(self) -> None:
        """Reorder nodes topologically (stable: keeps the current order where it is valid)."""
        order: list[Node] = []
        placed: set[int] = set()
        pending = list(self._nodes)
        while pending:
            rest = []
            progress = False
            for n in pending:
                if all(v.producer is None or id(v.producer) in placed for v in n.inputs):
                    order.append(n)
                    placed.add(id(n))
                    progress = True
                else:
                    rest.append(n)
            if not progress:
                raise VerificationError(f"graph has a cycle through {rest[0].name!r}")
            pending = rest
        self._nodes = order
        self._bump()

    # ---- invariants --------------------------------------------------------------------
    def verify(self) -> None:
        """Check the invariants; raise VerificationError naming the first broken one."""
        produced: set[int] = set()
        names: set[str] = set()
        for n in self._nodes:
            if n.name in names:
                raise VerificationError(f"duplicate node name {n.name!r}")
            names.add(n.name)
            for i, v in enumerate(n.inputs):
                if self._values.get(v.name) is not v:
                    raise VerificationError(f"{n.name!r} input {i} ({v.name!r}) is not in the graph")
                if id(v) not in produced:
                    raise VerificationError(f"{n.name!r} uses {v.name!r} before it is produced")
                if n not in v.uses:
                    raise VerificationError(f"use-list of {v.name!r} misses {n.name!r}")
            for v in n.outputs:
                if v.producer is not n:
                    raise VerificationError(f"{v.name!r} does not point back to its producer {n.name!r}")
                produced.add(id(v))
            if n.kind is OpKind.INPUT and n.inputs:
                raise VerificationError(f"input node {n.name!r} has inputs")
            if n.kind is OpKind.OUTPUT and (len(n.inputs) != 1 or n.outputs):
                raise VerificationError(f"output node {n.name!r} must have one input and no outputs")
            verify_node_params(n)
        for v in self._values.values():
            if v.producer is None or v.producer not in self._nodes:
                raise VerificationError(f"value {v.name!r} has no producer in the graph")
            for u in v.uses:
                if v not in u.inputs:
                    raise VerificationError(f"use-list of {v.name!r} names {u.name!r}, which does not use it")
        if not any(n.kind is OpKind.OUTPUT for n in self._nodes):
            raise VerificationError("graph has no output")

    # ---- copying -----------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """A flat record per node (values by name): pickling and ``copy.deepcopy`` then recurse no deeper
        than one node, where following ``inputs``/``producer`` links went as deep as the graph is long
        (Swin's few hundred nodes exceeded Python's recursion limit)."""
        nodes = [(n.kind, n.name, [v.name for v in n.inputs], [(v.name, v.shape, v.dtype) for v in n.outputs], n.params, n.attrs, n.origin)
                 for n in self._nodes]
        return {"name": self.name, "version": self.version, "meta": self.meta, "nodes": nodes, "handed_out": self._handed_out}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_nodes" in state:  # pickled by an earlier paic (its attribute dict): a .pt module saved before
            self.__dict__.update(state)
            self.__dict__.setdefault("_handed_out", set())
            return
        Graph.__init__(self, state["name"])
        for kind, name, inputs, outputs, params, attrs, origin in state["nodes"]:
            self.add_node(kind, name, [self._values[v] for v in inputs], outputs, params=params, attrs=attrs, origin=origin)
        self.meta, self.version, self._handed_out = state["meta"], state["version"], set(state["handed_out"])

    def clone(self) -> Graph:
        """A deep copy: nodes, values, params, masks and attributes are new objects; weight
        arrays are shared read-only (every mutation replaces them through ``set_param_data``)."""
        other = Graph(self.name)
        other.meta = copy.copy(self.meta)
        for key, value in self.meta.items():
            if isinstance(value, (list, dict, set)):
                other.meta[key] = copy.copy(value)
        params: dict[int, Param] = {}
        values: dict[int, Value] = {}
        for n in self._nodes:
            new_params = {}
            for key, p in n.params.items():
                if id(p) not in params:
                    params[id(p)] = Param(p.name, p.data, p.prunable, p.out_axis, p.in_axis, p.origin,
                                          None if p._mask is None else p._mask.copy(), p.per_use_copy)
                new_params[key] = params[id(p)]
            node = other.add_node(n.kind, n.name, [values[id(v)] for v in n.inputs],
                                  [(v.name, v.shape, v.dtype) for v in n.outputs],
                                  params=new_params, attrs=copy.deepcopy(n.attrs), origin=n.origin)
            for old, new in zip(n.outputs, node.outputs):
                values[id(old)] = new
        other._handed_out = set(self._handed_out)
        other.version = 0
        return other
