"""Protobuf wire-format access to ONNX files, so that big weights are never copied in memory.

An ONNX file is one serialized ``ModelProto``: a sequence of fields, each a varint key
``(number << 3) | wire_type`` then a value; a length-delimited value (wire type 2) is
``varint(length)`` followed by that many bytes. Weights sit in ``ModelProto.graph`` (7) →
``GraphProto.initializer`` (5) → ``TensorProto.raw_data`` (9), or, with external data, in
another file at ``TensorProto.external_data`` (13) ``{location, offset, length}``.

* :func:`open_model` memory-maps the file and parses a *skeleton* ``ModelProto``: every
  initializer whose ``raw_data`` has at least :data:`STRIP_BYTES` bytes is left out and
  returned instead as a read-only ``np.frombuffer`` view of the mapping (external data is
  mapped the same way). Loading costs the skeleton; weight pages are read on first touch.
* :func:`load_full_model` loads a whole ``ModelProto`` with its external data, for a writer
  that rewrites the proto (the masked writer's general path, the compact writer).
* ``pai_compiler.backends.onnx_stream`` writes a masked copy from these byte ranges.
* :func:`fields`, :func:`read_varint(s) <read_varints>`, :func:`read_text` and :func:`parse_tensor`
  are the field readers the frontend's ``proto_view`` decodes a whole model with (no onnx
  import); :func:`weight_views` gives its weights as views of the mapping, each checked against
  its dims and type, and :func:`tensor_dtype` maps ONNX element types to numpy's.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pai_compiler.errors import ModelError

__all__ = ["STRIP_BYTES", "WireError", "OnnxFile", "TensorRef", "open_model", "load_full_model", "check_model_file", "check_has_graph", "invalid_model", "release_mapped_pages", "fields", "parse_tensor", "read_varint", "read_varints", "read_text", "np_dtype", "tensor_dtype", "NUMPY_TYPES", "map_file", "skeleton_bytes", "weight_views", "string_pairs", "string_entry", "tag", "encode_varint"]

#: raw_data of at least this many bytes leaves the skeleton (shape constants stay inline)
STRIP_BYTES = 1 << 14
GRAPH, METADATA, INITIALIZER = 7, 14, 5
T_DIMS, T_TYPE, T_NAME, T_RAW, T_EXTERNAL, T_LOCATION = 1, 2, 8, 9, 13, 14
EXTERNAL = 1


class WireError(ValueError):
    """Malformed protobuf bytes."""


def read_varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it) of the varint at ``buf[pos]``."""
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def read_varints(buf: Any, wtype: int, start: int, end: int) -> list[int]:
    """The values of one field of a repeated integer: a single varint (wire type 0) or a packed run (2)."""
    if wtype == 0:
        return [read_varint(buf, start, end)[0]]
    if wtype != 2:
        raise WireError(f"integer field with wire type {wtype}")
    values, pos = [], start
    while pos < end:
        value, pos = read_varint(buf, pos, end)
        values.append(value)
    return values


def read_text(buf: Any, start: int, end: int) -> str:
    """The UTF-8 text of a string field's value ``buf[start:end]`` (invalid bytes replaced)."""
    return bytes(buf[start:end]).decode("utf-8", "replace")


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire type, field start, value start, value end) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        begin = pos
        key = buf[pos]  # one-byte varints (keys, short lengths) are read inline: the loader's hot loop
        key, pos = (key, pos + 1) if key < 0x80 else read_varint(buf, pos, end)
        number, wtype = key >> 3, key & 7
        if wtype == 0:
            vstart = pos
            pos = pos + 1 if pos < end and buf[pos] < 0x80 else read_varint(buf, pos, end)[1]
        elif wtype == 1:
            vstart, pos = pos, pos + 8
        elif wtype == 2:
            length, vstart = (buf[pos], pos + 1) if pos < end and buf[pos] < 0x80 else read_varint(buf, pos, end)
            pos = vstart + length
        elif wtype == 5:
            vstart, pos = pos, pos + 4
        else:
            raise WireError(f"unsupported wire type {wtype}")
        if number == 0 or pos > end:
            raise WireError("truncated or corrupt field")
        yield number, wtype, begin, vstart, pos


def tag(number: int, length: int) -> bytes:
    return encode_varint(number << 3 | 2) + encode_varint(length)


@dataclass
class TensorRef:
    """Where one initializer's bytes live: ``raw_data`` of the model file, or an external file."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    span: tuple[int, int] | None  # (start, end) of the tensor message in the model file
    raw: tuple[int, int] | None = None  # raw_data value range in the model file
    external: dict[str, str] | None = None

    @property
    def is_external(self) -> bool:
        return self.external is not None and "location" in self.external


@dataclass
class OnnxFile:
    """A memory-mapped ONNX file: skeleton proto, weight views, and where each weight lives."""

    path: Path
    model: Any
    arrays: dict[str, np.ndarray]
    tensors: dict[str, TensorRef]
    buffer: Any = field(repr=False)


def parse_tensor(buf: Any, start: int, end: int) -> TensorRef:
    ref = TensorRef("", 0, (), (start, end))
    dims: list[int] = []
    for number, wtype, _, vs, ve in fields(buf, start, end):
        if number == T_NAME and wtype == 2:
            ref.name = read_text(buf, vs, ve)
        elif number == T_TYPE and wtype == 0:
            ref.data_type = read_varint(buf, vs, ve)[0]
        elif number == T_DIMS and wtype in (0, 2):
            dims += read_varints(buf, wtype, vs, ve)
        elif number == T_RAW and wtype == 2:
            ref.raw = (vs, ve)
        elif number == T_EXTERNAL and wtype == 2:
            entry = dict(string_pairs(buf, vs, ve))
            if "key" in entry:
                ref.external = {**(ref.external or {}), entry["key"]: entry.get("value", "")}
    ref.dims = tuple(dims)
    return ref


def string_entry(number: int, key: str, value: str) -> bytes:
    """Field ``number`` holding a StringStringEntryProto {key, value}, encoded."""
    k, v = key.encode(), value.encode()
    body = tag(1, len(k)) + k + tag(2, len(v)) + v
    return tag(number, len(body)) + body


def string_pairs(buf: Any, start: int, end: int) -> Iterator[tuple[str, str]]:
    """StringStringEntryProto fields as ('key'|'value', text)."""
    for number, wtype, _, vs, ve in fields(buf, start, end):
        if wtype == 2 and number in (1, 2):
            yield ("key" if number == 1 else "value"), read_text(buf, vs, ve)


def _strippable(ref: TensorRef) -> bool:
    """Big raw data of a type numpy holds natively (bfloat16, float8, int4... stay in the proto)."""
    return ref.raw is not None and ref.raw[1] - ref.raw[0] >= STRIP_BYTES and np_dtype(ref.data_type) is not None


def skeleton_bytes(buf: Any) -> tuple[bytes, dict[str, TensorRef]]:
    """Skeleton bytes (big raw_data left out) and the TensorRef of every graph initializer."""
    tensors: dict[str, TensorRef] = {}
    out: list[Any] = []
    for number, wtype, begin, vs, ve in fields(buf, 0, len(buf)):
        if number != GRAPH or wtype != 2:
            out.append(buf[begin:ve])
            continue
        parts: list[Any] = []
        for gnum, gtype, gbegin, gvs, gve in fields(buf, vs, ve):
            if gnum == INITIALIZER and gtype == 2:
                ref = parse_tensor(buf, gvs, gve)
                tensors[ref.name] = ref
                if _strippable(ref):
                    kept = b"".join(bytes(buf[b:e]) for n, _, b, _, e in fields(buf, gvs, gve) if n != T_RAW)
                    parts.append(tag(INITIALIZER, len(kept)) + kept)
                    continue
            parts.append(bytes(buf[gbegin:gve]))
        body = b"".join(parts)
        out.append(tag(GRAPH, len(body)) + body)
    return b"".join(bytes(p) for p in out), tensors


#: ONNX TensorProto.DataType -> numpy dtype, for the types numpy holds natively (a fixed table:
#: reading a model never needs onnx's own, whose import costs more than the read)
NUMPY_TYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.float32), 2: np.dtype(np.uint8), 3: np.dtype(np.int8), 4: np.dtype(np.uint16),
    5: np.dtype(np.int16), 6: np.dtype(np.int32), 7: np.dtype(np.int64), 9: np.dtype(np.bool_),
    10: np.dtype(np.float16), 11: np.dtype(np.float64), 12: np.dtype(np.uint32), 13: np.dtype(np.uint64),
}
_OTHER_TYPES: dict[int, np.dtype[Any]] = {8: np.dtype(object), 14: np.dtype(np.complex64), 15: np.dtype(np.complex128)}


def np_dtype(data_type: int) -> np.dtype[Any] | None:
    """The numpy dtype of raw data of ONNX type ``data_type``; None for a type numpy lacks (bfloat16, float8, int4...)."""
    return NUMPY_TYPES.get(data_type)


def tensor_dtype(data_type: int) -> np.dtype[Any]:
    """``onnx.helper.tensor_dtype_to_np_dtype`` without importing onnx for the common types; a
    one-line ModelError for a type onnx does not know either (UNDEFINED, a newer or corrupt number)."""
    found = NUMPY_TYPES.get(data_type) or _OTHER_TYPES.get(data_type)
    if found is not None:
        return found
    from onnx import helper  # heavy: only for the exotic types (bfloat16, float8, int4: ml_dtypes)

    try:
        if data_type == 0:
            raise KeyError(data_type)
        return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
    except KeyError:
        raise ModelError(f"ONNX data type {data_type} is not a tensor type this onnx knows; re-export the model "
                         "with a standard element type (float32, float16, int64...)") from None


#: every live mapping made by :func:`open_model` (weak: a mapping goes when its last view does)
_MAPPED: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()


def map_file(path: Path) -> Any:
    with open(path, "rb") as fh:
        if not os.fstat(fh.fileno()).st_size:
            return b""
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    _MAPPED.add(mapped)
    return mapped


def release_mapped_pages() -> None:
    """Drop the resident pages of every mapped model file from this process's memory.

    They are clean file pages: the next read of a weight faults them back in from the page
    cache. Called between a phase that read every weight once (the audit) and one that needs
    memory but not the weights (DPaI), it lowers the peak RSS by up to the weights' size."""
    for mapped in list(_MAPPED):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # closed, or no madvise here
            mapped.madvise(mmap.MADV_DONTNEED)


def _external_view(ref: TensorRef, folder: Path, maps: dict[Path, Any], dtype: np.dtype[Any]) -> np.ndarray:
    info = ref.external or {}
    location = info.get("location", "")
    target = (folder / location).resolve()
    if not location or Path(location).is_absolute() or ".." in Path(location).parts:
        raise ModelError(f"tensor {ref.name!r}: external data location {location!r} must be a relative path inside the model's folder")
    if not target.is_file():
        raise ModelError(f"missing external data (tensor {ref.name!r}: {location} is not a file beside the model; copy it there)")
    if target not in maps:
        maps[target] = map_file(target)
    data = maps[target]
    offset = int(info.get("offset", 0) or 0)
    count = int(np.prod(ref.dims, dtype=np.int64))
    length = int(info.get("length", count * dtype.itemsize) or 0)
    if length != count * dtype.itemsize or offset < 0 or offset + length > len(data):
        raise ModelError(f"missing external data (tensor {ref.name!r}: bytes {offset}..{offset + length} of {location} "
                         f"do not hold {ref.dims} {dtype.name}; the file has {len(data)} bytes)")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(ref.dims)


def open_model(path: str | os.PathLike[str]) -> OnnxFile:
    """Map ``path``, parse its skeleton, and view its big and external weights in place."""
    import onnx

    p = Path(path)
    buf = map_file(p)
    try:
        skeleton, tensors = skeleton_bytes(memoryview(buf) if buf else b"")
        model = onnx.ModelProto()
        model.ParseFromString(skeleton)
    except Exception as exc:  # WireError, protobuf DecodeError
        raise invalid_model(p, exc) from None
    try:
        arrays = weight_views(p, buf, tensors)
    except ModelError as exc:
        raise ModelError(f"{p}: {exc}") from None
    return OnnxFile(p, model, arrays, tensors, buf)


def check_model_file(path: Path) -> None:
    """Raise a one-line ModelError unless ``path`` is a non-empty file."""
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: file is empty")


def check_has_graph(model: Any, path: Path) -> None:
    """Raise a one-line ModelError unless ``model`` has a graph with nodes or outputs."""
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelError(f"{path}: not a valid ONNX model (no graph)")


def load_full_model(path: str | os.PathLike[str]) -> Any:
    """Load a whole ModelProto with external data (for rewriting it), every failure a one-line ModelError."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    p = Path(path)
    check_model_file(p)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise invalid_model(p, exc) from None
    check_has_graph(model, p)
    try:
        if any(uses_external_data(t) for t in model.graph.initializer):
            load_external_data_for_model(model, str(p.parent))
    except Exception as exc:  # FileNotFoundError, onnx ValidationError for a missing/odd data file
        detail = " ".join(str(getattr(exc, "strerror", None) or exc).split())[:200]
        raise ModelError(f"{p}: missing external data ({detail})") from None
    return model


def invalid_model(path: Path, exc: Exception) -> ModelError:
    """The one-line error for a file that does not parse as an ONNX model."""
    first = str(exc).splitlines()[0] if str(exc) else "parse error"
    return ModelError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {first}); re-export or re-copy the file")


def weight_views(p: Path, buf: Any, tensors: dict[str, TensorRef], min_bytes: int = STRIP_BYTES) -> dict[str, np.ndarray]:
    """Views of the external weights and of the raw ones of at least ``min_bytes`` bytes (those the
    skeleton leaves out, by default), each checked against its shape and type."""
    arrays: dict[str, np.ndarray] = {}
    maps: dict[Path, Any] = {}
    for ref in tensors.values():
        dtype = np_dtype(ref.data_type)
        if ref.is_external and dtype is None:
            raise ModelError(f"tensor {ref.name!r}: external data of ONNX type {ref.data_type} is not supported; "
                             "store this tensor inside the model file (onnx.save(..., save_as_external_data=False))")
        if ref.is_external and dtype is not None:
            arrays[ref.name] = _external_view(ref, p.parent, maps, dtype)
        elif ref.raw is not None and dtype is not None and ref.raw[1] - ref.raw[0] >= min_bytes:
            count = int(np.prod(ref.dims, dtype=np.int64))
            if (ref.raw[1] - ref.raw[0]) != count * dtype.itemsize:
                raise ModelError(f"tensor {ref.name!r}: raw_data has {ref.raw[1] - ref.raw[0]} bytes, not {ref.dims} of type {ref.data_type}; the file is corrupt, re-export it")
            arrays[ref.name] = np.frombuffer(buf, dtype=dtype, count=count, offset=ref.raw[0]).reshape(ref.dims)
    return arrays
