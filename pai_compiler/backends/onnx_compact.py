"""Compact ONNX backend: the source model rewritten to the compacted IR's smaller layers.

After ``dead-node-elim`` the IR holds sliced Params, folded biases and new shapes, and its
``CompactReport`` names what changed. The source ONNX model is read again and rewritten,
node for node:

* every weight with an ONNX source (initializer, ``Constant``, ``ConstantOfShape``, sparse
  initializer) gets the IR's data times its mask — the sliced Conv/Gemm/MatMul/BN weights,
  biases and constants, BN running means that absorbed folded constants; a weight the model
  computes from stored tensors (torch prune's ``Mul(mask, weight_orig)``, weight norm) becomes
  a new initializer that its layers read (the computation is then dropped as unused);
* a folded bias the layer did not have becomes a new initializer: Conv's third input,
  Gemm's ``C`` (with ``beta=1``), or an ``Add`` after a ``MatMul``;
* a folded **bias map** (IR ``pointwise add`` with ``folded="bias_map"``) becomes an ``Add``
  of the map right after its layer (the layer's output is renamed, so consumers see the sum);
* a channel gather whose indices shrank (a plain Gather, or a fused channel shuffle: an ONNX
  ``Gather`` replaces the reshape/transpose chain) gets its new indices;
* a ``Resize`` by constant ``sizes`` gets its new channel count;
* ``Reshape`` targets of reshaped values become constants (symbolic dims: ``0`` = copy the
  input dim at that index, else a single ``-1``); where two symbolic dims need more than that,
  ``Where(changed, new, exported shape)`` keeps the exported runtime entries of the unchanged
  dims; ``Split`` sizes and Conv ``group`` follow;
* ``value_info`` is cleared (ORT re-infers it), nodes and initializers left without a use
  are dropped, metadata records the paic version and pipeline.

The result passes ``onnx.checker.check_model(full_check=True)`` and is written atomically;
as for the masked model, an input that already fails the checker only gets a warning (in
``graph.meta["warnings"]``), since the rewrite cannot repair it.
A changed Param that cannot be mapped back to the ONNX graph is an error naming it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pai_compiler._version import __version__
from pai_compiler.backends.onnx_compact_shapes import ShapeRewrites, set_input as _set_input
from pai_compiler.backends.onnx_masked import _check_like_source, rewire_computed, set_metadata
from pai_compiler.errors import PaicError
from pai_compiler.io import atomic_write
from pai_compiler.ir import Graph, Node, OpKind, Param
from pai_compiler.onnx_wire import load_full_model
from pai_compiler.passes.transform.dead_node_elim import CompactReport

__all__ = ["compact_model", "write_compact_onnx"]

_TWO_GB = 2**31 - 1
_NORM_INPUTS = {"scale": 1, "bias": 2, "mean": 3, "var": 4}


class _Rewriter(ShapeRewrites):
    def __init__(self, graph: Graph, model: Any, report: CompactReport) -> None:
        self.graph = graph
        self.report = report
        self.model = model
        self.g = model.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.producers = {o: n for n in self.g.node for o in n.output if o}
        self.names = {n.name for n in self.g.node} | set(self.inits) | {o for n in self.g.node for o in n.output} | {i.name for i in self.g.input}
        self.sources: dict[str, str] = graph.meta.get("weight_sources", {})
        self.uses: dict[str, tuple[int, int, tuple[int, ...] | None]] = graph.meta.get("constant_uses", {})
        self.by_index = list(self.g.node)  # before any insertion: constant_uses index the source's nodes
        self.computed_uses: dict[str, list[tuple[int, int]]] = graph.meta.get("computed_uses", {})
        self.changed: set[str] = set()

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def add_init(self, base: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.fresh(base)
        t = numpy_helper.from_array(np.ascontiguousarray(array), name)
        self.g.initializer.append(t)
        self.inits[name] = self.g.initializer[-1]
        return name

    def onnx_node(self, node: Node) -> Any:
        for v in node.outputs:
            if v.name in self.producers:
                return self.producers[v.name]
        return None

    # ---- weights with an ONNX source -------------------------------------------------------
    def write_param(self, p: Param) -> None:
        from onnx import helper, numpy_helper

        array = p.data if p.mask is None else np.where(p.mask, p.data, 0).astype(p.data.dtype)
        kind = self.sources[p.origin]
        if kind == "initializer":
            t = self.inits[p.origin]
            old = numpy_helper.to_array(t)
            if _unchanged(old, array):
                return
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array.astype(old.dtype, copy=False)), p.origin))
        elif kind == "sparse_initializer":
            for i, st in enumerate(self.g.sparse_initializer):
                if st.values.name == p.origin:
                    del self.g.sparse_initializer[i]
                    break
            self.g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), p.origin))
        elif kind in ("constant_node", "constant_of_shape"):
            if _unchanged(self._static(p.origin), array):  # kept as written (a Loop's scalar condition stays a scalar)
                return
            node = self.producers[p.origin]
            del node.attribute[:]
            del node.input[:]
            node.op_type, node.domain = "Constant", ""
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.ascontiguousarray(array), f"{p.origin}_value")))
        elif kind == "computed":  # a new initializer; the computation is dropped as unused
            self.names.add(rewire_computed(self.model, self.by_index, self.computed_uses.get(p.origin, []), array, f"{p.name}_compact"))
        else:
            raise PaicError(f"compact ONNX: cannot write weight {p.origin!r} (unknown source {kind!r})")

    def write_use(self, p: Param) -> None:
        """A per-use copy of a shared constant: when it changed, its consumer reads a fresh
        initializer (in the consumer's axis order); the shared original stays for the others."""
        array = p.data if p.mask is None else np.where(p.mask, p.data, 0).astype(p.data.dtype)
        current = self._static(p.origin)
        if current is not None and current.shape == array.shape and np.array_equal(current, array):
            return
        node_index, input_index, perm = self.uses[p.name]
        on = self.by_index[node_index]
        if perm is not None:
            array = np.transpose(array, perm)
        _set_input(on, input_index, self.add_init(f"{p.origin}_{on.name or on.op_type}", array))

    # ---- per-node rewrites -----------------------------------------------------------------
    def rename_output(self, onnx_node: Any, name: str) -> str:
        """Give ``onnx_node``'s output ``name`` a fresh name; return it (``name`` is then free)."""
        new = self.fresh(f"{name}__paic_pre")
        outs = list(onnx_node.output)
        outs[outs.index(name)] = new
        del onnx_node.output[:]
        onnx_node.output.extend(outs)
        self.producers[new] = onnx_node
        return new

    def add_after(self, onnx_node: Any, value: str, const: np.ndarray, label: str) -> None:
        """``value`` := ``value`` + ``const``, inserted right after its producer."""
        from onnx import helper

        pre = self.rename_output(onnx_node, value)
        init = self.add_init(f"{value}_{label}", const)
        add = helper.make_node("Add", [pre, init], [value], name=self.fresh(f"{onnx_node.name or value}_{label}"))
        nodes = list(self.g.node)
        index = next(i for i, n in enumerate(nodes) if n is onnx_node)
        self.g.node.insert(index + 1, add)
        self.producers[value] = self.g.node[index + 1]

    def weighted(self, node: Node, on: Any) -> None:
        from onnx import helper

        bias = node.params.get("bias")
        if on.op_type == "Conv":
            groups = int(node.attrs.get("groups", 1))
            current = next((a.i for a in on.attribute if a.name == "group"), 1)
            if current != groups:
                _set_int_attr(on, "group", groups)
        w = node.params["weight"]
        if not (w.origin and w.origin in self.sources) and w.name in self.changed:  # a computed weight, sliced
            array = w.data if w.mask is None else np.where(w.mask, w.data, 0).astype(w.data.dtype)
            _set_input(on, 1, self.add_init(f"{on.name or node.name}_weight", array))
        if bias is None or (bias.origin and bias.origin in self.sources):
            return
        had_bias = len(on.input) > 2 and bool(on.input[2])
        if had_bias and bias.name not in self.changed:
            return
        data = bias.data.astype(w.data.dtype)
        if on.op_type == "Conv":
            _set_input(on, 2, self.add_init(f"{on.name or node.name}_folded_bias", data))
        elif on.op_type == "Gemm":
            _set_input(on, 2, self.add_init(f"{on.name or node.name}_folded_bias", data))
            if not had_bias:  # a new C: beta (which scaled no C before) must be 1
                kept = [a for a in on.attribute if a.name != "beta"]
                del on.attribute[:]
                on.attribute.extend(kept + [helper.make_attribute("beta", 1.0)])
        elif on.op_type == "MatMul":
            self.add_after(on, node.outputs[0].name, data, "folded_bias")
        else:
            raise PaicError(f"compact ONNX: cannot add a folded bias to {on.op_type} node {on.name!r}")

    def operand(self, node: Node, on: Any, key: str, index: int) -> None:
        """A changed origin-less Param of ``node`` fed to input ``index`` of ``on``."""
        p = node.params[key]
        if (p.origin and p.origin in self.sources) or p.name not in self.changed:
            return
        if on is None or index >= len(on.input):
            raise PaicError(f"compact ONNX: param {p.name!r} of {node.name!r} has no ONNX source to rewrite")
        current = self._static(on.input[index])
        if current is not None and current.shape == p.data.shape and np.array_equal(current, p.data):
            return
        _set_input(on, index, self.add_init(f"{on.name or node.name}_{key}", p.data))

    def _static(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        n = self.producers.get(name)
        if n is not None and n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def run(self, pipeline: str) -> Any:
        reshapes, splits = set(self.report.reshapes), set(self.report.splits)
        self.changed = set(self.report.changed_params)
        params = self.graph.params()
        per_origin: dict[str, int] = {}
        for p in params:
            per_origin[p.origin] = per_origin.get(p.origin, 0) + 1
        for p in params:
            if p.origin and p.origin in self.sources:
                if per_origin[p.origin] > 1 and p.name in self.uses:  # one use of a shared constant
                    self.write_use(p)
                else:
                    self.write_param(p)
        for node in self.graph.nodes:
            on = self.onnx_node(node)
            if node.kind in (OpKind.CONV, OpKind.LINEAR):
                if on is None:
                    raise PaicError(f"compact ONNX: layer {node.name!r} has no ONNX node")
                self.weighted(node, on)
            elif node.kind is OpKind.POINTWISE and node.attrs.get("folded") == "bias_map":
                src = node.inputs[0].name
                if src not in self.producers:
                    raise PaicError(f"compact ONNX: bias map of {node.name!r} follows {src!r}, which no ONNX node produces")
                self.add_after(self.producers[src], src, node.params["const"].data, "folded_bias_map")
            elif node.kind is OpKind.POINTWISE and "const" in node.params:
                self.operand(node, on, "const", 0 if node.attrs.get("const_first") else 1)
            elif node.kind is OpKind.NORM:
                for key, index in _NORM_INPUTS.items():
                    if key in node.params:
                        self.operand(node, on, key, index)
            elif node.kind is OpKind.RESHAPE and node.name in reshapes and node.attrs.get("op") == "gather":
                self.gather(node, on)
            elif node.kind is OpKind.RESHAPE and node.name in reshapes:
                self.reshape(node, on)
            elif node.kind is OpKind.OPAQUE and node.attrs.get("op") == "resize":
                self.resize(node, on)
            elif node.kind is OpKind.SPLIT and node.name in splits:
                self.split(node, on)
            elif node.kind is OpKind.CONSTANT:
                p = node.params["value"]
                if not (p.origin and p.origin in self.sources) and p.name in self.changed:
                    raise PaicError(f"compact ONNX: constant {p.name!r} was resized but has no ONNX source")
        del self.g.value_info[:]
        _drop_unused(self.g)
        _sync_initializer_inputs(self.g, int(self.model.ir_version))
        items = {"paic.version": __version__, "paic.compact": "dead-node-elim"}
        if pipeline:
            items["paic.pipeline"] = pipeline
        set_metadata(self.model, items)
        return self.model


def _set_int_attr(on: Any, key: str, value: int) -> None:
    from onnx import helper

    kept = [a for a in on.attribute if a.name != key]
    del on.attribute[:]
    on.attribute.extend(kept + [helper.make_attribute(key, value)])


def _unchanged(old: np.ndarray | None, new: np.ndarray) -> bool:
    """The same values in the same order: the IR may hold a scalar as (1,) or a bias as [C, 1, 1]; the
    file keeps its own shape then, which its consumers expect."""
    return old is not None and old.size == new.size and np.array_equal(old.reshape(-1), new.reshape(-1))


def _reads(node: Any) -> set[str]:
    """The names ``node`` reads: its inputs and, through a Loop/If/Scan body, the outer-scope
    values its subgraphs use (a superset: names the body defines itself are harmless here)."""
    names = {i for i in node.input if i}
    for attribute in node.attribute:
        for body in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
            for inner in body.node:
                names |= _reads(inner)
    return names


def _drop_unused(g: Any) -> None:
    """Remove nodes whose outputs nothing reads (not graph outputs), then unused initializers."""
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in _reads(n)} | outputs
        dead = [i for i, n in enumerate(g.node) if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for i in reversed(dead):
            del g.node[i]
    used = {i for n in g.node for i in _reads(n)} | outputs | {i.name for i in g.input}
    keep = [t for t in g.initializer if t.name in used]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)


def _sync_initializer_inputs(g: Any, ir_version: int) -> None:
    """Graph inputs that name initializers get the new shapes (IR < 4 lists every initializer)."""
    from onnx import helper

    inits = {t.name: t for t in g.initializer}
    listed = set()
    for inp in g.input:
        t = inits.get(inp.name)
        if t is not None:
            listed.add(inp.name)
            inp.type.CopyFrom(helper.make_tensor_type_proto(t.data_type, list(t.dims)))
    if ir_version < 4:
        for name, t in inits.items():
            if name not in listed:
                g.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))


def compact_model(graph: Graph, model: Any, report: CompactReport, *, pipeline: str = "") -> Any:
    """Rewrite ``model`` (a ModelProto, modified in place and returned) to the compacted ``graph``.

    ``report``: everything dead-node-elim did to ``graph`` since it was read (merged reports)."""
    return _Rewriter(graph, model, report).run(pipeline)


def write_compact_onnx(graph: Graph, source: str | os.PathLike[str], out: str | os.PathLike[str], report: CompactReport, *, pipeline: str = "", check: bool = True) -> None:
    """Read ``source`` again, rewrite it to the compacted ``graph`` and write ``out`` atomically."""
    import onnx

    if graph.meta.get("source_format") != "onnx":
        raise PaicError("compact ONNX needs a model imported from ONNX (use the torch compact module otherwise)")
    model = compact_model(graph, load_full_model(source), report, pipeline=pipeline)
    out = Path(out)
    large = sum(len(t.raw_data) for t in model.graph.initializer) >= _TWO_GB // 2
    with atomic_write(out) as tmp:
        if large:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=out.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp))
        if check:  # the masked writer's policy: an error, unless the input already fails the checker
            graph.meta.setdefault("warnings", [])
            _check_like_source(tmp, source, graph)
