"""Streaming masked-ONNX writer: the source file copied with masked weight bytes, one tensor in memory.

The output is a list of pieces: bytes, a byte range of a source file, or a masked tensor
produced at write time. Untouched ranges are copied by the kernel (``copy_file_range``); each
masked initializer's ``raw_data`` keeps its length, so enclosing messages keep theirs; the
``paic.*`` ``metadata_props`` entries are dropped and appended anew; external tensors move to
``<output>.data`` (offsets aligned to 64 bytes, 4 KiB for tensors of 64 KiB or more) and their
``TensorProto`` is re-encoded with the new ``{location, offset, length}``. Both files are
written atomically (data file first, then the model).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from pai_compiler.errors import PaicError
from pai_compiler.io import atomic_write
from pai_compiler.onnx_wire import (
    EXTERNAL, GRAPH, INITIALIZER, METADATA, T_EXTERNAL, T_LOCATION, OnnxFile, TensorRef,
    encode_varint, fields, release_mapped_pages, string_entry, string_pairs, tag,
)

__all__ = ["write_masked"]

# a piece of output: bytes, a (file index, offset, length) copy, or (length, producer) computed at write time
Piece = Union[bytes, tuple[int, int, int], tuple[int, Callable[[], Any]]]


def _length(piece: Piece) -> int:
    if isinstance(piece, (bytes, bytearray)):
        return len(piece)
    return piece[-1] if len(piece) == 3 else piece[0]  # type: ignore[return-value,misc]


def _coalesce(pieces: list[Piece]) -> list[Piece]:
    """Merge adjacent copies of consecutive byte ranges of one file into one copy."""
    out: list[Piece] = []
    for piece in pieces:
        last = out[-1] if out else None
        if (isinstance(piece, tuple) and len(piece) == 3 and isinstance(last, tuple) and len(last) == 3
                and last[0] == piece[0] and last[1] + last[2] == piece[1]):  # type: ignore[misc,operator]
            out[-1] = (last[0], last[1], last[2] + piece[2])  # type: ignore[misc,operator]
        else:
            out.append(piece)
    return out


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
                data = np.ascontiguousarray(produce()).reshape(-1).view(np.uint8)  # any dtype (ml_dtypes too) as bytes
                if len(data) != length:
                    raise PaicError(f"internal error: masked tensor has {len(data)} bytes, expected {length}")
                fh.write(data)
                del data
                release_mapped_pages()  # the masked weight's pages were read through the mapping
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


@dataclass
class _ExternalLayout:
    """Where the external tensors go in ``<output>.data``: its pieces and each tensor's new (offset, length)."""

    data_name: str
    pieces: list[Piece] = field(default_factory=list)
    locations: dict[str, tuple[int, int]] = field(default_factory=dict)


def _external_layout(source: OnnxFile, files: list[Path], masked: Mapping[str, Callable[[], np.ndarray]], data_name: str) -> _ExternalLayout:
    """Lay out the data file tensor by tensor, in file order; ``files`` gains each source data file."""
    layout = _ExternalLayout(data_name)
    offset = 0
    for ref in source.tensors.values():
        if not ref.is_external:
            continue
        info = ref.external or {}
        length = int(source.arrays[ref.name].nbytes)  # open_model checked it against the file
        align = 4096 if length >= 1 << 16 else 64
        pad = -offset % align
        if pad:
            layout.pieces.append(b"\0" * pad)
            offset += pad
        location = (source.path.parent / info["location"]).resolve()
        if location not in files:
            files.append(location)
        layout.pieces.append((length, masked[ref.name]) if ref.name in masked else (files.index(location), int(info.get("offset", 0) or 0), length))
        layout.locations[ref.name] = (offset, length)
        offset += length
    return layout


def _tensor_pieces(buf: Any, ref: TensorRef, masked: Mapping[str, Callable[[], np.ndarray]], layout: _ExternalLayout) -> list[Piece]:
    """One initializer's ``TensorProto``: re-encoded with its new data location, or its raw bytes masked."""
    assert ref.span is not None
    start, end = ref.span
    if ref.name in layout.locations:
        pos, length = layout.locations[ref.name]
        kept = b"".join(bytes(buf[b:e]) for n, _, b, _, e in fields(buf, start, end) if n not in (T_EXTERNAL, T_LOCATION))
        entries = b"".join(string_entry(T_EXTERNAL, k, v) for k, v in (("location", layout.data_name), ("offset", str(pos)), ("length", str(length))))
        return [kept + entries + encode_varint(T_LOCATION << 3) + encode_varint(EXTERNAL)]
    if ref.name in masked:
        if ref.raw is None:
            raise PaicError(f"cannot stream weight {ref.name!r}: it has no raw_data")
        rs, re_ = ref.raw
        return [(0, start, rs - start), (re_ - rs, masked[ref.name]), (0, re_, end - re_)]
    return [(0, start, end - start)]


def _model_pieces(source: OnnxFile, masked: Mapping[str, Callable[[], np.ndarray]], metadata: Mapping[str, str], layout: _ExternalLayout) -> list[Piece]:
    """The model file: the source's fields, the changed initializers re-framed, ``metadata`` appended anew."""
    buf = source.buffer
    by_start = {ref.span[0]: ref for ref in source.tensors.values() if ref.span is not None}
    pieces: list[Piece] = []
    for number, wtype, begin, vs, ve in fields(buf, 0, len(buf)):
        if number == METADATA and wtype == 2 and dict(string_pairs(buf, vs, ve)).get("key") in metadata:
            continue
        if number != GRAPH or wtype != 2:
            pieces.append((0, begin, ve - begin))
            continue
        body: list[Piece] = []
        for gnum, gtype, gbegin, gvs, gve in fields(buf, vs, ve):
            ref = by_start.get(gvs) if gnum == INITIALIZER and gtype == 2 else None
            if ref is None or (ref.name not in masked and ref.name not in layout.locations):
                body.append((0, gbegin, gve - gbegin))
                continue
            inner = _tensor_pieces(buf, ref, masked, layout)
            body += [tag(INITIALIZER, sum(map(_length, inner))), *inner]
        pieces += [tag(GRAPH, sum(map(_length, body))), *body]
    return pieces + [string_entry(METADATA, k, v) for k, v in metadata.items()]


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
    files = [source.path]
    out = Path(out)
    layout = _external_layout(source, files, masked, out.name + ".data")
    missing = set(masked) - {r.name for r in source.tensors.values() if r.raw is not None or r.name in layout.locations}
    if missing:
        raise PaicError(f"cannot stream weight(s) {', '.join(sorted(missing)[:3])}: not stored as raw or external initializer data")
    pieces, data_pieces = _coalesce(_model_pieces(source, masked, metadata, layout)), _coalesce(layout.pieces)
    with atomic_write(out) as tmp_model:
        if layout.locations:
            with atomic_write(out.with_name(layout.data_name)) as tmp_data:
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
