"""ONNX frontend: an ONNX file or ModelProto -> paic IR Graph.

Walks the nodes in topological order. A node whose inputs are all known at compile time is
evaluated statically (shape subgraphs, folded constants); a node on constants whose *size*
depends on a symbol (``Range(0, seq)``, a table sliced to ``seq``, a mask expanded to the batch)
is kept as ``ShapeData`` and recomputed at run time (``shape_data``); any other node becomes IR
nodes through the op table in ``ops``. Weights may be initializers, ``Constant`` or
``ConstantOfShape`` outputs (possibly through Identity/Transpose/Cast), or computed from them
at compile time (``computed``: torch prune's ``Mul(mask, weight_orig)``, weight norm); each
prunable Param remembers where it came from (``graph.meta["weight_sources"]``, and
``computed_uses`` for computed ones) so the backend can write the mask back. Unknown operators become ``opaque`` nodes and are listed in the warnings.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np

from pai_compiler.frontends.onnx.computed import computed_weight_name
from pai_compiler.frontends.onnx.movement import DynamicArgument
from pai_compiler.frontends.onnx.ops import lower_node
from pai_compiler.frontends.onnx.shape_data import ShapeData, make_shape_data, shape_program
from pai_compiler.frontends.onnx.static import Const, concretize, eval_static, is_float_dtype
from pai_compiler.frontends.params import layout_twin
from pai_compiler.errors import ModelError, PaicError
from pai_compiler.frontends.onnx.proto_view import ModelView, NodeView, ValueInfoView, attribute_value, read_model, tensor_array, value_info_of, view_of
from pai_compiler.onnx_wire import tensor_dtype
from pai_compiler.progress import PHASE_DELAY, Phases, metric_bar
from pai_compiler.ir import Dim, Graph, OpKind, Param, Value
from pai_compiler.ir.dims import dim_symbol
from pai_compiler.passes.transform.patterns import fuse_patterns

__all__ = ["load_onnx_model", "import_onnx", "StaticDims"]

#: symbolic dims bound at load: every one to an int, or those a mapping names (see load_onnx_model)
StaticDims = Union[int, Mapping[str, int], None]

KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview", "ai.onnx.preview.training"}


def load_onnx_model(path: str | os.PathLike[str], static_dims: StaticDims = None, *, progress: bool = False) -> Graph:
    """Read and lower an ONNX file; every stored weight stays memory-mapped (``proto_view``), and
    onnx itself is imported only for what the view hands to it (rare encodings, opaque nodes).

    ``static_dims`` binds the file's symbolic dims (``dim_param``s and unnamed dims) at load: an
    int binds every one, a mapping the dims it names (the others stay symbols). The graph is then
    static where they were (no sympy, no symbolic shape algebra); ``graph.meta["bound_dims"]``
    lists what was bound. ``progress``: a load that runs long shows a bar on stderr (terminals only)."""

    p = Path(path)
    model, arrays = read_model(p)
    graph = import_onnx(model, name=p.stem, arrays=arrays, static_dims=static_dims, progress=progress)
    graph.meta["source_path"] = str(path)
    return graph


def _attrs(node: NodeView) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        value = attribute_value(node, a)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        out[a.name] = value
    return out


def _toposort(nodes: list[Any], available: set[str]) -> list[Any]:
    """Order nodes so each comes after its producers; raise on a cycle or a missing input."""
    producers = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    order: list[Any] = []
    state = [0] * len(nodes)  # 0 new, 1 visiting, 2 done
    for start in range(len(nodes)):
        if state[start]:
            continue
        stack = [(start, 0)]
        while stack:
            i, k = stack.pop()
            if k == 0:
                if state[i] == 2:
                    continue
                state[i] = 1
            ins = [x for x in nodes[i].input if x]
            while k < len(ins):
                src = producers.get(ins[k])
                if src is None:
                    if ins[k] not in available:
                        raise ModelError(f"node {nodes[i].name or nodes[i].op_type!r} ({nodes[i].op_type}): input {ins[k]!r} is neither produced by a node nor an initializer or graph input")
                    k += 1
                    continue
                if state[src] == 1:
                    raise ModelError(f"graph has a cycle through node {nodes[src].name or nodes[src].op_type!r} ({nodes[src].op_type})")
                if state[src] == 0:
                    stack.append((i, k + 1))
                    stack.append((src, 0))
                    break
                k += 1
            else:
                state[i] = 2
                order.append(nodes[i])
    return order


class _Importer:
    def __init__(self, model: ModelView, name: str, arrays: Mapping[str, np.ndarray] | None = None, static_dims: StaticDims = None) -> None:
        self.model = model
        self.static_dims = static_dims
        self.bound_dims: dict[str, int] = {}
        self.arrays = arrays or {}
        assert model.graph is not None
        self.graph = Graph(name or model.graph.name or "model")
        self.env: dict[str, Const | ShapeData | Value] = {}
        self.symbols: dict[str, Any] = {}  # dim name -> sympy Symbol
        self.params: dict[str, Param] = {}
        self.twins: dict[str, Param] = {}  # a weight's Params for its other layouts (see _params)
        self.copies: dict[str, int] = {}  # per-use copies made of each shared constant
        # Param name -> where its ONNX consumer reads it (graph.meta["constant_uses"]): the compact
        # backend gives a resized copy of a shared constant its own initializer there
        self.constant_uses: dict[str, tuple[int, int, tuple[int, ...] | None]] = {}
        self.visiting: tuple[int, list[Any]] | None = None  # (ONNX node index, its lowered inputs)
        self.claimed: set[int] = set()  # inputs of the visited node already given a constant use
        self.weight_sources: dict[str, str] = {}
        # a computed weight's ONNX value -> where ONNX nodes read it as a weight (see ``computed``)
        self.computed_uses: dict[str, list[tuple[int, int]]] = {}
        self.producers: dict[str, Any] | None = None  # ONNX value -> its node, built for the first computed weight
        self.warnings: list[str] = self.graph.meta["warnings"]
        self.inferred: dict[str, tuple[Dim, ...]] | None = None
        self.opset = {domain or "": version for domain, version in model.opset_import}
        self.shape_values: dict[str, Value] = {}

    # ---- helpers used by op handlers ---------------------------------------------------
    def symbol(self, name: str) -> Dim:
        """The dim named ``name``: its sympy symbol, or its value where ``static_dims`` binds it."""
        bound = self.static_dims if isinstance(self.static_dims, int) else (self.static_dims or {}).get(name)
        if bound is not None:
            self.bound_dims[name] = bound
            return bound
        if name not in self.symbols:
            self.symbols[name] = dim_symbol(name)
        return self.symbols[name]

    def dims_from_type(self, info: ValueInfoView) -> tuple[Dim, ...] | None:
        if not info.is_tensor or info.dims is None:
            return None
        dims: list[Dim] = []
        for i, d in enumerate(info.dims):
            if isinstance(d, int):
                dims.append(d)
            else:
                dims.append(self.symbol(d or f"unk{len(self.symbols)}_{i}"))
        return tuple(dims)

    def inferred_shape(self, name: str) -> tuple[Dim, ...] | None:
        """Shape from onnx's own shape inference, used only for opaque nodes."""
        if self.inferred is None:
            import onnx

            self.inferred = {}
            try:
                inferred = onnx.shape_inference.infer_shapes(self.model.to_proto())
                for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
                    dims = self.dims_from_type(value_info_of(vi.SerializeToString()))
                    if dims is not None:
                        self.inferred[vi.name] = dims
            except Exception:  # inference is best effort
                pass
        return self.inferred.get(name)

    def param(self, const: Const, key: str, *, prunable: bool, out_axis: int = 0, in_axis: int | None = 1) -> Param:
        """A Param for a constant operand. A stored weight maps back to its origin tensor; a
        weight computed from stored tensors is its computed ONNX value (``_computed_param``)."""
        if prunable and const.origin is None and const.computed is not None and const.broadcast_to is None:
            use = self._operand_index(const)
            if use is not None:
                return self._computed_param(const, use, out_axis, in_axis)
        if const.origin is None or const.symbolic:
            data = np.asarray(const.array)
            if data.dtype == object:
                strings = data.size > 0 and isinstance(data.flat[0], (bytes, str))
                what = "a string tensor" if strings else "a shape-dependent (symbolic) value"
                raise ModelError(f"{what} is used as tensor data, which paic does not support; store it as a numeric tensor")
            return Param(self.graph.fresh_name(key), data, prunable=False, out_axis=out_axis, in_axis=in_axis, origin="")
        perm = const.perm or tuple(range(const.array.ndim))
        # axes of the stored tensor that become the operand's out/in axes
        if prunable:
            stored_out, stored_in = perm[out_axis], (perm[in_axis] if in_axis is not None else None)
        else:
            stored_out, stored_in = 0, None
        existing = self.params.get(const.origin)
        use = None if prunable else self._constant_use(const)
        if existing is not None:
            if prunable or existing.prunable or use is None or existing.name not in self.constant_uses:  # a tie
                return layout_twin(existing, stored_out, stored_in, self.twins, self.warnings) if prunable else existing
            # a constant the exporter stored once for equal tensors: one copy per use
            copies = self.copies[const.origin] = self.copies.get(const.origin, 0) + 1
            p = Param(f"{const.origin}.use{copies}", existing.data, prunable=False, out_axis=0, in_axis=None,
                      origin=const.origin, per_use_copy=True)
            self.constant_uses[p.name] = use
            return p
        stored = self.stored[const.origin]
        p = Param(const.origin, stored, prunable=prunable, out_axis=stored_out, in_axis=stored_in, origin=const.origin)
        self.params[const.origin] = p
        if use is not None:
            self.constant_uses[p.name] = use
        return p

    def _computed_param(self, const: Const, use: tuple[int, int], out_axis: int, in_axis: int | None) -> Param:
        """The prunable Param of a weight computed from stored tensors: one per computed ONNX value
        (every reader of that value shares it, a tie), named after the tensor it is made from."""
        value = const.computed
        assert value is not None
        self.computed_uses.setdefault(value, []).append(use)
        existing = self.params.get(value)
        if existing is not None:
            return layout_twin(existing, out_axis, in_axis, self.twins, self.warnings)
        if self.producers is None:
            self.producers = {o: n for n in self.model.graph.node for o in n.output if o}  # type: ignore[union-attr]
        data = np.asarray(const.array)
        name = computed_weight_name(value, data.size, self.producers, self.stored, self.readers)
        p = Param(self.graph.fresh_name(name), data, prunable=True, out_axis=out_axis, in_axis=in_axis, origin=value)
        self.params[value] = p
        self.weight_sources[value] = "computed"
        return p

    def _operand_index(self, const: Const) -> tuple[int, int] | None:
        """(ONNX node index, input index) where the node being lowered reads ``const``; an input
        already claimed is skipped (one initializer at several inputs: dynamo's BN with var = scale)."""
        if self.visiting is None:
            return None
        node_index, inputs = self.visiting
        index = next((i for i, x in enumerate(inputs) if x is const and i not in self.claimed), None)
        if index is None:
            return None
        self.claimed.add(index)
        return node_index, index

    def _constant_use(self, const: Const) -> tuple[int, int, tuple[int, ...] | None] | None:
        """Where the ONNX node being lowered reads ``const``: (node index, input index, axis order
        of the stored tensor), or None when it reads a derived tensor (cast, broadcast, computed)
        that a per-use copy could not be written back as."""
        if const.broadcast_to is not None or const.origin is None:
            return None
        if const.array.dtype != self.stored[const.origin].dtype:
            return None
        where = self._operand_index(const)
        if where is None:
            return None
        perm = None if const.perm is None or const.perm == tuple(range(len(const.perm))) else const.perm
        return where[0], where[1], perm

    def operand_value(self, x: Const | ShapeData | Value, hint: str) -> Value:
        """A Value for an operand; constants become CONSTANT nodes, size-computed data a ``shape_data`` node."""
        if isinstance(x, Value):
            return x
        if isinstance(x, ShapeData):
            return self._shape_data_value(x)
        if x.perm is not None and tuple(x.perm) != tuple(range(len(x.perm))):
            x = Const(np.asarray(x.array), broadcast_to=x.broadcast_to)  # a transposed stored tensor: its own copy, in the operand's axis order
        shape = x.broadcast_to or tuple(int(d) for d in x.array.shape)
        p = self.param(x, f"{hint}_const", prunable=False)
        node = self.graph.add_node(
            OpKind.CONSTANT,
            self.graph.fresh_name(f"{hint}_const"),
            (),
            [(self.graph.fresh_name(f"{hint}_const_out"), shape, str(p.data.dtype))],
            params={"value": p},
            attrs={"broadcast": x.broadcast_to is not None},
        )
        return node.outputs[0]

    def consumed_elsewhere(self, node: Any) -> set[str]:
        """The inputs of ``node`` that another ONNX node or a graph output also reads."""
        return {name for name in node.input if self.readers.get(name, 0) > list(node.input).count(name)}

    def _shape_data_value(self, data: ShapeData) -> Value:
        """One opaque ``op="shape_data"`` node per size-computed tensor (reused by every reader)."""
        existing = self.shape_values.get(data.output)
        if existing is not None:
            return existing
        program = shape_program(data, self.opset.get("", 17))
        node = self.graph.add_node(OpKind.OPAQUE, self.graph.fresh_name(data.output + "_shape_data"), (),
                                   [(self.graph.fresh_name(data.output), data.shape, str(data.dtype))],
                                   attrs={"op": "shape_data", "program": program, "op_type": "ShapeData", "domain": ""}, origin=data.output)
        self.shape_values[data.output] = node.outputs[0]
        return node.outputs[0]

    # ---- main walk ---------------------------------------------------------------------
    def run(self, phases: Phases | None = None) -> Graph:
        """The lowered graph; ``phases`` (a progress feed) ticks once per ONNX node."""
        g = self.model.graph
        assert g is not None
        self._load_initializers()
        self._add_inputs()
        self.consumed = {i for n in g.node for i in n.input if i} | {o.name for o in g.output}
        self.readers: dict[str, int] = {}
        for name in [i for n in g.node for i in n.input if i] + [o.name for o in g.output]:
            self.readers[name] = self.readers.get(name, 0) + 1
        nodes = list(g.node)
        self.positions = {id(n): i for i, n in enumerate(nodes)}
        for index, node in enumerate(_toposort(nodes, set(self.env))):
            self._lower(node, index)
            if phases is not None:
                phases.tick()
        self.visiting = None
        self._add_outputs()
        self.graph.meta.update(
            symbols=dict(self.symbols),
            bound_dims=dict(self.bound_dims),
            weight_sources={k: v for k, v in self.weight_sources.items() if k in self.params},
            constant_uses=dict(self.constant_uses),
            computed_uses={k: list(v) for k, v in self.computed_uses.items()},
            opset=self.opset,
            source_format="onnx",
            ir_version=int(self.model.ir_version),
        )
        return self.graph

    def _load_initializers(self) -> None:
        """Every dense and sparse initializer as a stored constant (memory-mapped arrays where given)."""
        g = self.model.graph
        assert g is not None
        self.stored: dict[str, np.ndarray] = {}
        for t in g.initializer:
            arr = self.arrays[t.name] if t.name in self.arrays else tensor_array(self.model.buffer, t.span or (0, 0))
            self.stored[t.name] = arr
            self.env[t.name] = Const(arr, origin=t.name)
            self.weight_sources[t.name] = "initializer"
        if not g.sparse_initializer:
            return
        from onnx import SparseTensorProto, numpy_helper  # heavy: onnx decodes sparse initializers

        for span in g.sparse_initializer:
            st = SparseTensorProto.FromString(self.model.message(span))
            name = st.values.name
            dense = numpy_helper.to_array(st.values)
            arr = np.zeros(tuple(st.dims), dtype=dense.dtype)
            idx = numpy_helper.to_array(st.indices)
            if idx.ndim == 1:
                arr.reshape(-1)[idx] = dense
            else:
                arr[tuple(idx.T)] = dense
            self.stored[name] = arr
            self.env[name] = Const(arr, origin=name)
            self.weight_sources[name] = "sparse_initializer"

    def _add_inputs(self) -> None:
        """An INPUT node for every graph input that is not an initializer."""
        assert self.model.graph is not None
        for inp in self.model.graph.input:
            if inp.name in self.stored:
                continue
            shape = self.dims_from_type(inp)
            elem = inp.elem_type if inp.is_tensor else 1
            node = self.graph.add_node(OpKind.INPUT, self.graph.fresh_name(inp.name), (), [(inp.name, shape, _dtype_name(elem))], origin=inp.name)
            self.env[inp.name] = node.outputs[0]

    def _lower(self, node: Any, index: int) -> None:
        """Lower one ONNX node; any failure becomes a ModelError naming the node and its op."""
        if node.domain not in KNOWN_DOMAINS:
            raise ModelError(f"node {node.name or node.op_type!r} ({node.op_type}): unknown operator domain {node.domain!r}")
        if node.domain == "" and node.op_type in ("If", "Loop", "Scan"):
            self.warnings.append(f"control flow node {node.name!r} ({node.op_type}) is opaque")
        label = node.name or f"{node.op_type}_{index}"
        try:
            self._visit(node, index)
        except PaicError as exc:
            if str(exc).startswith("node "):
                raise
            raise ModelError(f"node {label!r} ({node.op_type}): {exc}") from exc
        except Exception as exc:  # a construct we do not handle: name the node and op
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            raise ModelError(f"node {label!r} ({node.op_type}): cannot be lowered: {detail}") from exc

    def _add_outputs(self) -> None:
        """An OUTPUT node for every graph output (a constant output gets its CONSTANT node)."""
        assert self.model.graph is not None
        for out in self.model.graph.output:
            x = self.env.get(out.name)
            if x is None:
                raise ModelError(f"graph output {out.name!r} is not produced by any node")
            v = self.operand_value(x, out.name)
            self.graph.add_node(OpKind.OUTPUT, self.graph.fresh_name(f"output_{out.name}"), (v,), origin=out.name)

    def _visit(self, node: Any, index: int) -> None:
        ins: list[Const | Value | None] = []
        for name in node.input:
            if not name:
                ins.append(None)
                continue
            ins.append(self.env[name])
        self.visiting, self.claimed = (self.positions[id(node)], ins), set()
        attrs = _attrs(node)
        label = node.name or f"{node.op_type}_{index}"
        if node.op_type == "Constant":
            value = _constant_value(attrs, label)
            self.stored[node.output[0]] = value
            self.env[node.output[0]] = Const(value, origin=node.output[0])
            self.weight_sources[node.output[0]] = "constant_node"
            return
        if node.op_type == "Shape" and isinstance(ins[0], (Value, ShapeData)) and ins[0].shape is not None:
            dims = ins[0].shape[attrs.get("start", 0) : attrs.get("end")]
            self.env[node.output[0]] = Const(concretize(np.array(list(dims), dtype=object)))
            return
        if all(x is None or isinstance(x, (Const, ShapeData)) for x in ins) and node.op_type not in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"):
            if self._try_static(node, ins, attrs, label) or self._try_shape_data(node, ins, attrs):
                return
        ins = [self._shape_data_value(x) if isinstance(x, ShapeData) else x for x in ins]
        lower_node(self, node, label, ins, attrs)

    def _try_shape_data(self, node: Any, ins: list[Any], attrs: dict[str, Any]) -> bool:
        """A node on constants of which some are sized by symbols: its value is computed from the
        sizes alone (``ShapeData``). False when no operand depends on a size or paic has no shape rule."""
        if not any(isinstance(x, ShapeData) or (isinstance(x, Const) and (x.symbolic or x.broadcast_to is not None)) for x in ins):
            return False
        if len(node.output) != 1:
            return False
        try:
            self.env[node.output[0]] = make_shape_data(node, ins, attrs)
        except (DynamicArgument, ModelError, TypeError, ValueError, IndexError):
            return False
        return True

    def _try_static(self, node: Any, ins: list[Any], attrs: dict[str, Any], label: str) -> bool:
        op = node.op_type
        if any(isinstance(x, ShapeData) for x in ins):
            return False
        consts: list[Const | None] = list(ins)
        first = consts[0] if consts else None
        if op in ("Identity", "Transpose", "Cast") and first is not None and first.origin is not None and not first.symbolic:
            arr = first.array
            if op == "Cast":
                to = tensor_dtype(attrs["to"])
                if not (is_float_dtype(to) and is_float_dtype(arr.dtype)):
                    self.env[node.output[0]] = Const.folded(arr.astype(to), node.output[0])
                    return True
                self.env[node.output[0]] = Const(arr.astype(to), first.origin, first.perm)
                return True
            perm = tuple(range(arr.ndim))
            if op == "Transpose":
                perm = tuple(attrs.get("perm", list(reversed(range(arr.ndim)))))
            base = first.perm or tuple(range(arr.ndim))
            self.env[node.output[0]] = Const(np.transpose(arr, perm), first.origin, tuple(base[p] for p in perm))
            return True
        if op == "ConstantOfShape" and first is not None and not first.symbolic:
            value = eval_static(op, consts, attrs)
            assert value is not None
            self.stored[node.output[0]] = value[0]
            self.env[node.output[0]] = Const(value[0], origin=node.output[0])
            self.weight_sources[node.output[0]] = "constant_of_shape"
            return True
        if op == "Expand" and first is not None and consts[1] is not None and consts[1].symbolic and not first.symbolic:
            from pai_compiler.frontends.onnx.static import broadcast_shapes

            target = tuple(d if not isinstance(d, (int, np.integer)) else int(d) for d in consts[1].array.reshape(-1))
            self.env[node.output[0]] = Const(first.array, first.origin, first.perm, broadcast_shapes(first.array.shape, target))
            return True
        if any(c is not None and c.broadcast_to is not None for c in consts):
            return False
        result = eval_static(op, consts, attrs)
        if result is None:
            if any(c is not None and c.symbolic for c in consts):
                return False
            result = _reference_eval(node, consts)
            if result is None:
                return False
        for name, arr in zip(node.output, result):
            if name:
                self.env[name] = Const.folded(arr, name)
        return True


def _constant_value(attrs: dict[str, Any], label: str) -> np.ndarray:
    for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
        if key in attrs:
            v = attrs[key]
            if key == "value":
                return np.asarray(v)
            dtype = np.float32 if "float" in key else np.int64
            return np.asarray(v, dtype=dtype)
    if "sparse_value" in attrs:
        from onnx import numpy_helper

        sv = attrs["sparse_value"]
        arr = np.zeros(tuple(sv.dims), dtype=numpy_helper.to_array(sv.values).dtype)
        arr.reshape(-1)[numpy_helper.to_array(sv.indices).reshape(-1)] = numpy_helper.to_array(sv.values)
        return arr
    raise ModelError(f"Constant node {label!r} has no value attribute")


def _reference_eval(node: Any, consts: list[Const | None]) -> list[np.ndarray] | None:
    """Fold an all-constant node with onnx's reference evaluator (numeric inputs only)."""
    try:
        from onnx import helper
        from onnx.reference import ReferenceEvaluator

        names = [f"i{i}" for i in range(len(consts))]
        inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(c.array.dtype), c.array.shape) for n, c in zip(names, consts) if c is not None]
        clone = helper.make_node(node.op_type, [n if c is not None else "" for n, c in zip(names, consts)], [f"o{i}" for i in range(len(node.output))], domain=node.domain, **{a.name: helper.get_attribute_value(a) for a in node.to_proto().attribute})
        outputs = [helper.make_tensor_value_info(f"o{i}", 0, None) for i in range(len(node.output))]
        g = helper.make_graph([clone], "fold", inputs, outputs)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid(node.domain, 18 if not node.domain else 1)])
        feeds = {n: c.array for n, c in zip(names, consts) if c is not None}
        with np.errstate(all="ignore"):  # log(0) = -inf (T5's relative buckets) is the intended value, as in onnxruntime
            return [np.asarray(r) for r in ReferenceEvaluator(m).run(None, feeds)]
    except Exception:
        return None


def _dtype_name(elem_type: int) -> str:
    try:
        return str(tensor_dtype(elem_type))
    except Exception:
        return "float32"


def import_onnx(model: ModelView | Any, name: str = "", arrays: Mapping[str, np.ndarray] | None = None,
                static_dims: StaticDims = None, *, progress: bool = False) -> Graph:
    """Lower a model (a ModelView, or an onnx ModelProto, viewed through its serialized bytes) to the
    IR; ``arrays`` gives initializer data by name, the rest is read from the model; ``static_dims``
    as in :func:`load_onnx_model`. ``progress``: a bar over the ONNX nodes and the pattern/verify
    phases, drawn only when the load runs long."""
    if not isinstance(model, ModelView):
        model = view_of(model.SerializeToString())
    if model.graph is None:
        raise ModelError("not a valid ONNX model (no graph)")
    total = len(model.graph.node) + 2
    with metric_bar(progress, "[bold]load[/]", total, unit="nodes", delay=PHASE_DELAY) as bar:
        phases = Phases(bar, total, every=64)
        phases.begin("lowering", name)
        graph = _Importer(model, name, arrays, static_dims).run(phases)
        phases.begin("patterns", f"{len(graph.nodes):,} IR nodes")
        fuse_patterns(graph)
        phases.tick()
        phases.begin("verify", f"{len(graph.nodes):,} IR nodes")
        graph.verify()
        phases.finish()
    return graph
