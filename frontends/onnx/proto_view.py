"""A read-only view of an ONNX ``ModelProto`` decoded straight from the wire, without importing onnx.

The frontend reads names, op types, attributes, value types and initializer locations; decoding
those few fields from the memory-mapped file (``onnx_wire.fields``) costs less than importing
onnx (protobuf, ml_dtypes) alone. Field numbers are onnx.proto's: ModelProto {ir_version 1,
opset_import 8, graph 7}, GraphProto {node 1, name 2, initializer 5, input 11, output 12,
sparse_initializer 15}, NodeProto {input 1, output 2, name 3, op_type 4, attribute 5, domain 7},
AttributeProto {name 1, f 2, i 3, s 4, t 5, floats 7, ints 8, strings 9, type 20, ref_attr_name 21},
ValueInfoProto {name 1, type 2}, TypeProto {tensor_type 1: {elem_type 1, shape 2: {dim 1:
{dim_value 1, dim_param 2}}}}. Anything rarer (graph, sparse or type attributes, typed-field
tensors, sparse initializers, shape inference) is handed to onnx itself through ``to_proto``,
so its meaning is onnx's, exactly as before.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pai_compiler.errors import ModelError
from pai_compiler.onnx_wire import (
    TensorRef, WireError, check_model_file, fields, invalid_model, map_file, np_dtype, parse_tensor, read_text,
    read_varint, read_varints, skeleton_bytes, tensor_dtype, weight_views,
)

__all__ = ["AttributeView", "NodeView", "ValueInfoView", "GraphView", "ModelView", "read_model", "view_of", "value_info_of",
           "tensor_array", "attribute_value"]

# attribute types decoded here (onnx.AttributeProto.AttributeType); others go through onnx
FLOAT, INT, STRING, TENSOR, FLOATS, INTS, STRINGS = 1, 2, 3, 4, 6, 7, 8
_SIGN = 1 << 63


def _int64(value: int) -> int:
    """A varint as protobuf's int64 (negatives are 10-byte two's complement)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value & _SIGN else value


@dataclass
class AttributeView:
    """One node attribute: its name, its AttributeType and where its message lies."""

    name: str = ""
    type: int = 0
    span: tuple[int, int] = (0, 0)
    ref_attr_name: str = ""
    f: float = 0.0
    i: int = 0
    s: bytes = b""
    t: tuple[int, int] | None = None  # the TensorProto's value range
    floats: list[float] = field(default_factory=list)
    ints: list[int] = field(default_factory=list)
    strings: list[bytes] = field(default_factory=list)


@dataclass
class NodeView:
    """One NodeProto: what the frontend reads of it, and ``to_proto`` for anything else."""

    buffer: Any = field(repr=False, compare=False)
    span: tuple[int, int]
    input: list[str] = field(default_factory=list)
    output: list[str] = field(default_factory=list)
    name: str = ""
    op_type: str = ""
    domain: str = ""
    attribute: list[AttributeView] = field(default_factory=list)

    def to_proto(self) -> Any:
        from onnx import NodeProto  # heavy: only rare nodes need onnx's own message

        return NodeProto.FromString(bytes(self.buffer[self.span[0]:self.span[1]]))


@dataclass
class ValueInfoView:
    """A graph input/output: name, element type and dims (int, or the dim_param text; None: unset)."""

    name: str = ""
    is_tensor: bool = False
    elem_type: int = 0
    dims: list[int | str] | None = None


@dataclass
class GraphView:
    """A GraphProto: its nodes, initializers (where their bytes lie), graph inputs and outputs."""

    name: str = ""
    node: list[NodeView] = field(default_factory=list)
    initializer: list[TensorRef] = field(default_factory=list)
    sparse_initializer: list[tuple[int, int]] = field(default_factory=list)  # SparseTensorProto value ranges
    input: list[ValueInfoView] = field(default_factory=list)
    output: list[ValueInfoView] = field(default_factory=list)


@dataclass
class ModelView:
    """A ModelProto's frontend-facing fields; ``buffer`` holds the serialized model (or its mapping)."""

    buffer: Any = field(repr=False, compare=False)
    ir_version: int = 0
    opset_import: list[tuple[str, int]] = field(default_factory=list)
    graph: GraphView | None = None

    def to_proto(self) -> Any:
        """onnx's ModelProto of the same bytes, big raw weights left out (for shape inference)."""
        import onnx  # heavy: only opaque nodes' shape inference needs it

        return onnx.ModelProto.FromString(skeleton_bytes(self.buffer)[0])

    def message(self, span: tuple[int, int]) -> bytes:
        """The serialized sub-message at ``span`` (e.g. a sparse initializer, for onnx to parse)."""
        return bytes(self.buffer[span[0]:span[1]])


def _attribute(buf: Any, start: int, end: int) -> AttributeView:
    attr = AttributeView(span=(start, end))
    for number, wtype, _, vs, ve in fields(buf, start, end):
        if number == 1 and wtype == 2:
            attr.name = read_text(buf, vs, ve)
        elif number == 20 and wtype == 0:
            attr.type = read_varint(buf, vs, ve)[0]
        elif number == 21 and wtype == 2:
            attr.ref_attr_name = read_text(buf, vs, ve)
        elif number == 2 and wtype == 5:
            attr.f = struct.unpack_from("<f", buf, vs)[0]
        elif number == 3 and wtype == 0:
            attr.i = _int64(read_varint(buf, vs, ve)[0])
        elif number == 4 and wtype == 2:
            attr.s = bytes(buf[vs:ve])
        elif number == 5 and wtype == 2:
            attr.t = (vs, ve)
        elif number == 7:
            attr.floats += _floats(buf, wtype, vs, ve)
        elif number == 8:
            attr.ints += _ints(buf, wtype, vs, ve)
        elif number == 9 and wtype == 2:
            attr.strings.append(bytes(buf[vs:ve]))
    return attr


def _floats(buf: Any, wtype: int, start: int, end: int) -> list[float]:
    if wtype == 5:
        return [struct.unpack_from("<f", buf, start)[0]]
    if wtype == 2:  # packed
        return list(struct.unpack_from(f"<{(end - start) // 4}f", buf, start))
    raise WireError(f"float field with wire type {wtype}")


def _ints(buf: Any, wtype: int, start: int, end: int) -> list[int]:
    return [_int64(value) for value in read_varints(buf, wtype, start, end)]


def _node(buf: Any, start: int, end: int) -> NodeView:
    node = NodeView(buf, (start, end))
    for number, wtype, _, vs, ve in fields(buf, start, end):
        if wtype != 2:
            continue
        if number == 1:
            node.input.append(read_text(buf, vs, ve))
        elif number == 2:
            node.output.append(read_text(buf, vs, ve))
        elif number == 3:
            node.name = read_text(buf, vs, ve)
        elif number == 4:
            node.op_type = read_text(buf, vs, ve)
        elif number == 5:
            node.attribute.append(_attribute(buf, vs, ve))
        elif number == 7:
            node.domain = read_text(buf, vs, ve)
    return node


def _value_info(buf: Any, start: int, end: int) -> ValueInfoView:
    info = ValueInfoView()
    for number, wtype, _, vs, ve in fields(buf, start, end):
        if number == 1 and wtype == 2:
            info.name = read_text(buf, vs, ve)
        elif number == 2 and wtype == 2:
            for tnum, ttype, _, tvs, tve in fields(buf, vs, ve):
                if tnum == 1 and ttype == 2:
                    info.is_tensor = True
                    _tensor_type(buf, tvs, tve, info)
    return info


def _tensor_type(buf: Any, start: int, end: int, info: ValueInfoView) -> None:
    for number, wtype, _, vs, ve in fields(buf, start, end):
        if number == 1 and wtype == 0:
            info.elem_type = read_varint(buf, vs, ve)[0]
        elif number == 2 and wtype == 2:
            info.dims = info.dims or []
            for dnum, dtype, _, dvs, dve in fields(buf, vs, ve):
                if dnum == 1 and dtype == 2:
                    info.dims.append(_dim(buf, dvs, dve))


def _dim(buf: Any, start: int, end: int) -> int | str:
    """dim_value when set (oneof: the last one given wins, as protobuf reads it), else dim_param ('' if none)."""
    value: int | str = ""
    for number, wtype, _, vs, ve in fields(buf, start, end):
        if number == 1 and wtype == 0:
            value = _int64(read_varint(buf, vs, ve)[0])
        elif number == 2 and wtype == 2:
            value = read_text(buf, vs, ve)
    return value


def _graph(buf: Any, start: int, end: int) -> GraphView:
    graph = GraphView()
    for number, wtype, _, vs, ve in fields(buf, start, end):
        if wtype != 2:
            continue
        if number == 1:
            graph.node.append(_node(buf, vs, ve))
        elif number == 2:
            graph.name = read_text(buf, vs, ve)
        elif number == 5:
            graph.initializer.append(parse_tensor(buf, vs, ve))
        elif number == 11:
            graph.input.append(_value_info(buf, vs, ve))
        elif number == 12:
            graph.output.append(_value_info(buf, vs, ve))
        elif number == 15:
            graph.sparse_initializer.append((vs, ve))
    return graph


def _model(buf: Any) -> ModelView:
    model = ModelView(buf)
    for number, wtype, _, vs, ve in fields(buf, 0, len(buf)):
        if number == 1 and wtype == 0:
            model.ir_version = _int64(read_varint(buf, vs, ve)[0])
        elif number == 8 and wtype == 2:
            domain, version = "", 0
            for onum, otype, _, ovs, ove in fields(buf, vs, ve):
                if onum == 1 and otype == 2:
                    domain = read_text(buf, ovs, ove)
                elif onum == 2 and otype == 0:
                    version = _int64(read_varint(buf, ovs, ove)[0])
            model.opset_import.append((domain, version))
        elif number == 7 and wtype == 2:
            model.graph = _graph(buf, vs, ve)
    return model


def view_of(data: Any) -> ModelView:
    """The view of serialized ModelProto bytes (or a mapping of them); WireError if malformed."""
    return _model(memoryview(data) if data else b"")


def value_info_of(data: bytes) -> ValueInfoView:
    """The view of one serialized ValueInfoProto (e.g. from onnx's shape inference)."""
    return _value_info(data, 0, len(data))


def read_model(path: Path) -> tuple[ModelView, dict[str, np.ndarray]]:
    """Map ``path`` and view its model; every raw and external weight is a read-only view of the mapping.

    Errors are one-line ModelErrors naming the file: missing/empty, not a model, no graph, bad weights."""
    check_model_file(path)
    buf = map_file(path)
    try:
        model = view_of(buf)
    except (WireError, struct.error, UnicodeDecodeError) as exc:
        raise invalid_model(path, exc) from None
    if model.graph is None or (not model.graph.node and not model.graph.output):
        raise ModelError(f"{path}: not a valid ONNX model (no graph)")
    try:
        arrays = weight_views(path, buf, {t.name: t for t in model.graph.initializer}, min_bytes=1)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    return model, arrays


def tensor_array(buffer: Any, span: tuple[int, int]) -> np.ndarray:
    """The array of the TensorProto at ``buffer[span]``: raw data of a numpy type is viewed in place,
    any other encoding (typed fields, bfloat16, strings...) is decoded by onnx's ``numpy_helper``."""
    ref = parse_tensor(buffer, *span)
    dtype = np_dtype(ref.data_type)
    if ref.raw is not None and ref.raw[1] > ref.raw[0] and dtype is not None and not ref.is_external:
        count = int(np.prod(ref.dims, dtype=np.int64))
        if ref.raw[1] - ref.raw[0] == count * dtype.itemsize:
            return np.frombuffer(buffer, dtype=dtype, count=count, offset=ref.raw[0]).reshape(ref.dims)
    from onnx import TensorProto, numpy_helper  # heavy: only for tensors not stored as raw data

    try:
        tensor_dtype(ref.data_type)
    except ModelError as exc:
        raise ModelError(f"tensor {ref.name!r}: {exc}") from None
    try:
        return numpy_helper.to_array(TensorProto.FromString(bytes(buffer[span[0]:span[1]])))
    except Exception as exc:  # onnx's ValueError/TypeError for data that does not fill the dims, DecodeError
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
        raise ModelError(f"tensor {ref.name!r}: its data does not decode as {list(ref.dims)} of ONNX type "
                         f"{ref.data_type} ({detail}); the file is corrupt, re-export it") from None


def attribute_value(node: NodeView, attr: AttributeView) -> Any:
    """What ``onnx.helper.get_attribute_value`` returns, except that a TENSOR is its numpy array."""
    if attr.ref_attr_name or attr.type not in (FLOAT, INT, STRING, TENSOR, FLOATS, INTS, STRINGS) or (attr.type == TENSOR and attr.t is None):
        from onnx import AttributeProto, helper, numpy_helper  # heavy: graph/sparse/type attributes only

        proto = AttributeProto.FromString(bytes(node.buffer[attr.span[0]:attr.span[1]]))
        value = helper.get_attribute_value(proto)
        return numpy_helper.to_array(value) if proto.type == proto.TENSOR else value
    if attr.type == TENSOR:
        assert attr.t is not None
        return tensor_array(node.buffer, attr.t)
    return {FLOAT: attr.f, INT: attr.i, STRING: attr.s, FLOATS: list(attr.floats), INTS: list(attr.ints),
            STRINGS: list(attr.strings)}[attr.type]
