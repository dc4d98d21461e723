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
* :func:`write_masked` streams the source to a new file: untouched byte ranges are copied by
  the kernel (``copy_file_range``), each masked weight's ``raw_data`` (same length) is
  produced one tensor at a time, the ``paic.*`` metadata entries are replaced, and external
  tensors move to ``<output>.data`` (offsets aligned to 64 bytes, 4 KiB for big tensors).
  Memory: one tensor. Files are written atomically (data file first, then the model).
"""
from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from pai_compiler.errors import ModelError, PaicError
from pai_compiler.io import atomic_write

__all__ = ["STRIP_BYTES", "OnnxFile", "TensorRef", "open_model", "write_masked"]

#: raw_data of at least this many bytes leaves the skeleton (shape constants stay inline)
STRIP_BYTES = 1 << 14
_GRAPH, _METADATA, _INITIALIZER = 7, 14, 5
_T_DIMS, _T_TYPE, _T_NAME, _T_RAW, _T_EXTERNAL, _T_LOCATION = 1, 2, 8, 9, 13, 14
_EXTERNAL = 1


class WireError(ValueError):
    """Malformed protobuf bytes."""


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
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


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire type, field start, value start, value end) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        begin = pos
        key, pos = _varint(buf, pos, end)
        number, wtype = key >> 3, key & 7
        if wtype == 0:
            vstart, (_, pos) = pos, _varint(buf, pos, end)
        elif wtype == 1:
            vstart, pos = pos, pos + 8
        elif wtype == 2:
            length, vstart = _varint(buf, pos, end)
            pos = vstart + length
        elif wtype == 5:
            vstart, pos = pos, pos + 4
        else:
            raise WireError(f"unsupported wire type {wtype}")
        if number == 0 or pos > end:
            raise WireError("truncated or corrupt field")
        yield number, wtype, begin, vstart, pos


def _tag(number: int, length: int) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(length)


@dataclass
class TensorRef:
    """Where one initializer's bytes live: ``raw_data`` of the model file, or an external file."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    span: tuple[int, int] | None  # (start, end) of the tensor message in the model file
    raw: tuple[int, int] | None = None  # raw_data value range in the model file
    external: dict[str, str] | None = None


@dataclass
class OnnxFile:
    """A memory-mapped ONNX file: skeleton proto, weight views, and where each weight lives."""

    path: Path
    model: Any
    arrays: dict[str, np.ndarray]
    tensors: dict[str, TensorRef]
    buffer: Any = field(repr=False)
    graph_span: tuple[int, int] | None = None  # value range of ModelProto.graph


def _parse_tensor(buf: Any, start: int, end: int) -> TensorRef:
    ref = TensorRef("", 0, (), (start, end))
    dims: list[int] = []
    for number, wtype, _, vs, ve in _fields(buf, start, end):
        if number == _T_NAME and wtype == 2:
            ref.name = bytes(buf[vs:ve]).decode("utf-8", "replace")
        elif number == _T_TYPE and wtype == 0:
            ref.data_type = _varint(buf, vs, ve)[0]
        elif number == _T_DIMS and wtype == 0:
            dims.append(_varint(buf, vs, ve)[0])
        elif number == _T_DIMS and wtype == 2:  # packed
            pos = vs
            while pos < ve:
                value, pos = _varint(buf, pos, ve)
                dims.append(value)
        elif number == _T_RAW and wtype == 2:
            ref.raw = (vs, ve)
        elif number == _T_EXTERNAL and wtype == 2:
            entry = {k: v for k, v in _string_pairs(buf, vs, ve)}
            ref.external = {**(ref.external or {}), **({entry["key"]: entry.get("value", "")} if "key" in entry else {})}
    ref.dims = tuple(dims)
    return ref


def _string_pairs(buf: Any, start: int, end: int) -> Iterator[tuple[str, str]]:
    """StringStringEntryProto fields as ('key'|'value', text)."""
    for number, wtype, _, vs, ve in _fields(buf, start, end):
        if wtype == 2 and number in (1, 2):
            yield ("key" if number == 1 else "value"), bytes(buf[vs:ve]).decode("utf-8", "replace")


def _scan(buf: Any) -> tuple[bytes, dict[str, TensorRef], tuple[int, int] | None]:
    """Skeleton bytes (big raw_data left out) and the TensorRef of every graph initializer."""
    tensors: dict[str, TensorRef] = {}
    out: list[Any] = []
    graph_span = None
    for number, wtype, begin, vs, ve in _fields(buf, 0, len(buf)):
        if number != _GRAPH or wtype != 2:
            out.append(buf[begin:ve])
            continue
        graph_span = (vs, ve)
        parts: list[Any] = []
        for gnum, gtype, gbegin, gvs, gve in _fields(buf, vs, ve):
            if gnum == _INITIALIZER and gtype == 2:
                ref = _parse_tensor(buf, gvs, gve)
                tensors[ref.name] = ref
                if ref.raw is not None and ref.raw[1] - ref.raw[0] >= STRIP_BYTES:
                    kept = b"".join(bytes(buf[b:e]) for n, _, b, _, e in _fields(buf, gvs, gve) if n != _T_RAW)
                    parts.append(_tag(_INITIALIZER, len(kept)) + kept)
                    continue
            parts.append(bytes(buf[gbegin:gve]))
        body = b"".join(parts)
        out.append(_tag(_GRAPH, len(body)) + body)
    return b"".join(bytes(p) for p in out), tensors, graph_span


def _np_dtype(data_type: int) -> np.dtype[Any] | None:
    from onnx import helper

    if data_type in (1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13):
        return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
    return None


def _map(path: Path) -> Any:
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""


def _external_view(ref: TensorRef, folder: Path, maps: dict[Path, Any], dtype: np.dtype[Any]) -> np.ndarray:
    info = ref.external or {}
    location = info.get("location", "")
    target = (folder / location).resolve()
    if not location or Path(location).is_absolute() or ".." in Path(location).parts:
        raise ModelError(f"tensor {ref.name!r}: external data location {location!r} must be a relative path inside the model's folder")
    if not target.is_file():
        raise ModelError(f"missing external data (tensor {ref.name!r}: {location} is not a file beside the model)")
    if target not in maps:
        maps[target] = _map(target)
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
    buf = _map(p)
    try:
        skeleton, tensors, graph_span = _scan(memoryview(buf) if buf else b"")
        model = onnx.ModelProto()
        model.ParseFromString(skeleton)
    except Exception as exc:  # WireError, protobuf DecodeError
        raise ModelError(f"{p}: not a valid ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'parse error'})") from None
    arrays: dict[str, np.ndarray] = {}
    maps: dict[Path, Any] = {}
    for ref in tensors.values():
        dtype = _np_dtype(ref.data_type)
        external = ref.external is not None and "location" in ref.external
        if external and dtype is None:
            raise ModelError(f"tensor {ref.name!r}: external data of ONNX type {ref.data_type} is not supported")
        if external and dtype is not None:
            arrays[ref.name] = _external_view(ref, p.parent, maps, dtype)
        elif ref.raw is not None and ref.raw[1] - ref.raw[0] >= STRIP_BYTES:
            count = int(np.prod(ref.dims, dtype=np.int64))
            if dtype is None or (ref.raw[1] - ref.raw[0]) != count * dtype.itemsize:
                raise ModelError(f"tensor {ref.name!r}: raw_data has {ref.raw[1] - ref.raw[0]} bytes, not {ref.dims} of type {ref.data_type}")
            arrays[ref.name] = np.frombuffer(buf, dtype=dtype, count=count, offset=ref.raw[0]).reshape(ref.dims)
    return OnnxFile(p, model, arrays, tensors, buf, graph_span)


# ---- streaming writer ------------------------------------------------------------------------
# a piece of output: bytes, a (file index, offset, length) copy, or (length, producer) computed at write time
Piece = Union[bytes, tuple[int, int, int], tuple[int, Callable[[], Any]]]


def _length(piece: Piece) -> int:
    if isinstance(piece, (bytes, bytearray)):
        return len(piece)
    return piece[-1] if len(piece) == 3 else piece[0]  # type: ignore[return-value,misc]


def _write(fh: Any, pieces: list[Piece], files: list[Path]) -> None:
    fds: dict[int, int] = {}
    try:
        for piece in pieces:
            if isinstance(piece, (bytes, bytearray)):
                fh.write(piece)
            elif len(piece) == 3:
                index, offset, length = piece  # type: ignore[misc]
                if index not in fds:
                    fds[index] = os.open(files[index], os.O_RDONLY)
                fh.flush()
                _copy_range(fds[index], fh.fileno(), offset, length)
            else:
                length, produce = piece  # type: ignore[misc]
                data = memoryview(produce()).cast("B")
                if len(data) != length:
                    raise PaicError(f"internal error: masked tensor has {len(data)} bytes, expected {length}")
                fh.write(data)
    finally:
        for fd in fds.values():
            os.close(fd)


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """Copy src[offset:offset+length] to dst's current position (in the kernel where possible)."""
    while length > 0:
        try:
            done = os.copy_file_range(src, dst, min(length, 1 << 30), offset)
        except (AttributeError, OSError):
            done = 0
        if done <= 0:  # no copy_file_range (other OS or file system): plain reads
            chunk = os.pread(src, min(length, 1 << 24), offset)
            if not chunk:
                raise PaicError("source file shrank while it was being copied")
            os.write(dst, chunk)
            done = len(chunk)
        offset += done
        length -= done


def _metadata_entry(key: str, value: str) -> bytes:
    k, v = key.encode(), value.encode()
    body = _tag(1, len(k)) + k + _tag(2, len(v)) + v
    return _tag(_METADATA, len(body)) + body


def write_masked(
    source: OnnxFile,
    out: str | os.PathLike[str],
    masked: Mapping[str, Callable[[], np.ndarray]],
    metadata: Mapping[str, str],
    *,
    check: Callable[[Path, Path | None], None] | None = None,
) -> None:
    """Write ``source`` with each ``masked[name]()`` array replacing that initializer's bytes.

    Every masked name must be a graph initializer with raw or external data of the same size.
    ``check(model_tmp, data_tmp)`` runs on the temp files before they replace ``out``."""
    buf, files = source.buffer, [source.path]
    out = Path(out)
    external = [ref for ref in source.tensors.values() if ref.external is not None and "location" in ref.external]
    data_pieces: list[Piece] = []
    new_locations: dict[str, tuple[int, int]] = {}
    offset = 0
    for ref in external:  # file order: the data file is rebuilt tensor by tensor
        info = ref.external or {}
        dtype = _np_dtype(ref.data_type)
        length = int(np.prod(ref.dims, dtype=np.int64)) * (dtype.itemsize if dtype is not None else 0)
        align = 4096 if length >= 1 << 16 else 64
        pad = -offset % align
        if pad:
            data_pieces.append(b"\0" * pad)
            offset += pad
        location = (source.path.parent / info["location"]).resolve()
        if location not in files:
            files.append(location)
        data_pieces.append((length, masked[ref.name]) if ref.name in masked else (files.index(location), int(info.get("offset", 0) or 0), length))
        new_locations[ref.name] = (offset, length)
        offset += length
    data_name = out.name + ".data"

    def tensor_pieces(ref: TensorRef) -> list[Piece]:
        assert ref.span is not None
        start, end = ref.span
        if ref.name in new_locations:
            pos, length = new_locations[ref.name]
            kept = b"".join(bytes(buf[b:e]) for n, _, b, _, e in _fields(buf, start, end) if n not in (_T_EXTERNAL, _T_LOCATION))
            entries = b"".join(_tag(_T_EXTERNAL, len(e)) + e for e in (
                _tag(1, 8) + b"location" + _tag(2, len(data_name.encode())) + data_name.encode(),
                _tag(1, 6) + b"offset" + _tag(2, len(str(pos))) + str(pos).encode(),
                _tag(1, 6) + b"length" + _tag(2, len(str(length))) + str(length).encode()))
            return [kept + entries + _encode_varint(_T_LOCATION << 3) + _encode_varint(_EXTERNAL)]
        if ref.name in masked:
            if ref.raw is None:
                raise PaicError(f"cannot stream weight {ref.name!r}: it has no raw_data")
            rs, re_ = ref.raw
            return [(0, start, rs - start), (re_ - rs, masked[ref.name]), (0, re_, end - re_)]
        return [(0, start, end - start)]

    pieces: list[Piece] = []
    for number, wtype, begin, vs, ve in _fields(buf, 0, len(buf)):
        if number == _METADATA and wtype == 2 and dict(_string_pairs(buf, vs, ve)).get("key") in metadata:
            continue
        if number != _GRAPH or wtype != 2:
            pieces.append((0, begin, ve - begin))
            continue
        body: list[Piece] = []
        for gnum, gtype, gbegin, gvs, gve in _fields(buf, vs, ve):
            ref = source.tensors.get(_parse_tensor(buf, gvs, gve).name) if gnum == _INITIALIZER and gtype == 2 else None
            if ref is None or (ref.name not in masked and ref.name not in new_locations):
                body.append((0, gbegin, gve - gbegin))
                continue
            inner = tensor_pieces(ref)
            body += [_tag(_INITIALIZER, sum(map(_length, inner))), *inner]
        pieces += [_tag(_GRAPH, sum(map(_length, body))), *body]
    pieces += [_metadata_entry(k, v) for k, v in metadata.items()]
    missing = set(masked) - {r.name for r in source.tensors.values() if r.raw is not None or r.name in new_locations}
    if missing:
        raise PaicError(f"cannot stream weight(s) {', '.join(sorted(missing)[:3])}: not stored as raw or external initializer data")
    with atomic_write(out) as tmp_model:
        if external:
            with atomic_write(out.with_name(data_name)) as tmp_data:
                with open(tmp_data, "wb") as fh:
                    _write(fh, data_pieces, files)
                with open(tmp_model, "wb") as fh:
                    _write(fh, pieces, files)
                if check is not None:
                    check(tmp_model, tmp_data)
        else:
            with open(tmp_model, "wb") as fh:
                _write(fh, pieces, files)
            if check is not None:
                check(tmp_model, None)
