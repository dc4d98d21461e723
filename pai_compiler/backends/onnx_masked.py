"""Masked ONNX backend: the input model with each prunable weight multiplied by its mask.

Everything else is kept as it was: node order and names, opset, other initializers byte for
byte. A weight stored as an initializer is rewritten in place; one produced by a ``Constant``
node gets a new ``value``; one produced by ``ConstantOfShape`` is replaced, at the same
position and with the same output name, by a ``Constant`` holding the masked tensor. A weight
the model computes from stored tensors (torch prune's ``Mul(mask, weight_orig)``, weight norm)
becomes a new initializer holding the computed weight times its mask, and the nodes that read
it as a weight read that instead (``rewire_computed``; the computation is left dead). The
paic version and pipeline go into ``metadata_props``. The file is written atomically.

Initializer weights (raw or external data) are streamed from the source file without loading
it (``pai_compiler.onnx_wire``); Constant/ConstantOfShape/sparse weights take the general path
(load the proto, edit, save).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pai_compiler._version import __version__
from pai_compiler.backends.onnx_stream import write_masked
from pai_compiler.errors import PaicError
from pai_compiler.io import atomic_write
from pai_compiler.ir import Graph, Param
from pai_compiler.onnx_wire import load_full_model, open_model

__all__ = ["masked_model", "write_masked_onnx", "set_metadata", "rewire_computed"]

_TWO_GB = 2**31 - 1


def _masked_array(stored: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = np.array(stored, copy=True)
    out[~mask] = 0
    return out


def set_metadata(model: Any, items: Mapping[str, str]) -> None:
    keep = [p for p in model.metadata_props if p.key not in items]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in items.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def rewire_computed(model: Any, nodes: Sequence[Any], uses: Sequence[Sequence[int]], array: np.ndarray, base: str) -> str:
    """Add ``array`` as a new initializer (a fresh name from ``base``) and point every use
    ``(node index, input index)`` of a computed weight (``graph.meta["computed_uses"]``; indices
    into ``nodes``, the source's node list) at it. Returns the initializer's name."""
    from onnx import helper, numpy_helper

    if not uses:
        raise PaicError(f"cannot write computed weight {base!r}: no ONNX node is recorded as reading it")
    g = model.graph
    taken = {t.name for t in g.initializer} | {i.name for i in g.input} | {o for n in g.node for o in n.output}
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    if model.ir_version < 4:  # IR 3 lists every initializer as a graph input
        g.input.append(helper.make_tensor_value_info(name, g.initializer[-1].data_type, list(array.shape)))
    for node_index, input_index in uses:
        node = nodes[node_index]
        inputs = list(node.input)
        inputs[input_index] = name
        del node.input[:]
        node.input.extend(inputs)
    return name


def masked_model(graph: Graph, model: Any, *, pipeline: str = "") -> Any:
    """Apply ``graph``'s masks to ``model`` (a ModelProto, modified in place and returned)."""
    from onnx import helper, numpy_helper

    sources: dict[str, str] = graph.meta.get("weight_sources", {})
    masked: dict[str, Param] = {p.origin: p for p in graph.prunable_params() if p.mask is not None and p.origin}
    missing = [name for name in masked if name not in sources]
    if missing:
        raise PaicError(f"cannot write masks: weight(s) {', '.join(missing[:3])} have no ONNX source")
    inits = {t.name: t for t in model.graph.initializer}
    sparse = {t.values.name: t for t in model.graph.sparse_initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    nodes = list(model.graph.node)
    computed_uses: dict[str, list[tuple[int, int]]] = graph.meta.get("computed_uses", {})
    for origin, p in masked.items():
        kind = sources[origin]
        array = _masked_array(p.data, p.mask)  # type: ignore[arg-type]
        if kind == "initializer":
            t = inits[origin]
            new = numpy_helper.from_array(array.astype(p.data.dtype, copy=False), origin)
            t.ClearField("float_data")
            t.ClearField("double_data")
            t.ClearField("int32_data")
            t.ClearField("int64_data")
            del t.external_data[:]
            t.data_location = 0
            t.raw_data = new.raw_data
        elif kind == "sparse_initializer":
            st = sparse[origin]
            flat = array.reshape(-1)
            idx = np.flatnonzero(flat).astype(np.int64)
            st.values.CopyFrom(numpy_helper.from_array(flat[idx], origin))
            st.indices.CopyFrom(numpy_helper.from_array(idx, st.indices.name or f"{origin}_indices"))
        elif kind in ("constant_node", "constant_of_shape"):
            node = producers[origin]
            value = numpy_helper.from_array(array, f"{origin}_value")
            if kind == "constant_node":
                attrs = [a for a in node.attribute if not a.name.startswith("value") and a.name != "sparse_value"]
                del node.attribute[:]
                node.attribute.extend(attrs)
            else:
                del node.attribute[:]
                del node.input[:]
                node.op_type = "Constant"
                node.domain = ""
            node.attribute.append(helper.make_attribute("value", value))
        elif kind == "computed":
            rewire_computed(model, nodes, computed_uses.get(origin, []), array, f"{p.name}_masked")
        else:
            raise PaicError(f"cannot write mask of {origin!r}: unknown weight source {kind!r}")
    set_metadata(model, _metadata_items(pipeline))
    return model


def write_masked_onnx(graph: Graph, source: str | os.PathLike[str], out: str | os.PathLike[str], *, pipeline: str = "", check: bool = True) -> None:
    """Write ``source`` with ``graph``'s masks applied to ``out``, atomically.

    When every masked weight is an initializer with raw or external data (the usual case) the
    file is streamed (``onnx_stream.write_masked``: one tensor in memory, external data kept
    external in ``<out>.data``); otherwise the source is loaded, edited and saved."""
    params = {p.origin: p for p in graph.prunable_params() if p.mask is not None and p.origin}
    wire = open_model(source)
    if _streamable(graph, wire, params):
        masked = {o: (lambda p=p: _masked_array(p.data, p.mask)) for o, p in params.items()}  # type: ignore[misc]
        verify = (lambda model, data: _check_like_source(model, source, graph, data, Path(out).name)) if check else None
        write_masked(wire, out, masked, _metadata_items(pipeline), check=verify)
        return
    del wire
    _write_loaded(graph, source, out, pipeline=pipeline, check=check)


def _streamable(graph: Graph, wire: Any, params: Mapping[str, Param]) -> bool:
    """Every masked weight is an initializer with raw or external data in the source file, of
    exactly its array's size (a type numpy widens on reading, e.g. bfloat16, takes the general path)."""
    sources: dict[str, str] = graph.meta.get("weight_sources", {})

    def stored_bytes(name: str) -> int:  # -1: neither raw nor external data
        ref = wire.tensors[name]
        if ref.raw is not None:
            return ref.raw[1] - ref.raw[0]
        return int(wire.arrays[name].nbytes) if name in wire.arrays else -1

    return all(sources.get(o) == "initializer" and o in wire.tensors and stored_bytes(o) == p.data.nbytes for o, p in params.items())


def _metadata_items(pipeline: str) -> dict[str, str]:
    items = {"paic.version": __version__}
    if pipeline:
        items["paic.pipeline"] = pipeline
    return items


def _write_loaded(graph: Graph, source: str | os.PathLike[str], out: str | os.PathLike[str], *, pipeline: str, check: bool) -> None:
    """The general path: load the whole source, apply the masks to the proto, save it."""
    import onnx

    model = masked_model(graph, load_full_model(source), pipeline=pipeline)
    out = Path(out)
    large = model.ByteSize() > _TWO_GB if _estimate_small(model) else True
    with atomic_write(out) as tmp:
        if large:
            data_name = out.name + ".data"
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            # onnx wrote the data file beside tmp under its final name; the model file is atomic
        else:
            onnx.save_model(model, str(tmp))
        if check:
            _check_like_source(tmp, source, graph)


def _check_like_source(written: Path, source: str | os.PathLike[str], graph: Graph, data: Path | None = None, final: str = "") -> None:
    """The output must pass ``onnx.checker`` (full check) unless the input already fails it.

    A streamed output (``final`` = its file name) is checked without loading its weights: its
    temp files are moved, under their final names, into a private folder beside them, and the
    checker reads a copy of the skeleton whose big tensors point at their bytes in those files
    as external data (so every byte range is still checked); ``data`` holds the external data."""
    import onnx

    try:
        if final:
            with _external_skeleton(written, data, final) as skeleton:
                onnx.checker.check_model(str(skeleton), full_check=True)
        else:
            onnx.checker.check_model(str(written), full_check=True)
        return
    except Exception as exc:  # never leave an invalid model behind that we made invalid
        problem = " ".join(str(exc).split())[:200]
    try:
        onnx.checker.check_model(str(source), full_check=True)
    except Exception:
        graph.meta["warnings"].append(f"the input model already fails onnx.checker ({problem}); the output keeps that")
        return
    raise PaicError(f"the written model fails onnx.checker: {problem}")


@contextlib.contextmanager
def _external_skeleton(written: Path, data: Path | None, final: str) -> Iterator[Path]:
    """``<folder>/<final>.check.onnx``: the skeleton of ``written`` with its big raw tensors as external data.

    The temp files are renamed into the folder for the check and back afterwards (onnx refuses
    hard and symbolic links as external data)."""
    import onnx

    folder = Path(tempfile.mkdtemp(prefix=".paic-check-", dir=written.parent))
    moves = [(written, folder / final)] + ([(data, folder / (final + ".data"))] if data is not None else [])
    try:
        for src, dst in moves:
            os.rename(src, dst)
        wire = open_model(folder / final)
        for t in wire.model.graph.initializer:
            ref = wire.tensors.get(t.name)
            if ref is not None and ref.raw is not None and t.name in wire.arrays:
                t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                for key, value in (("location", final), ("offset", str(ref.raw[0])), ("length", str(ref.raw[1] - ref.raw[0]))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
        skeleton = folder / (final + ".check.onnx")  # a name neither output file can have
        onnx.save_model(wire.model, str(skeleton))
        del wire
        yield skeleton
    finally:
        for src, dst in moves:
            if dst.exists():
                os.rename(dst, src)
        shutil.rmtree(folder, ignore_errors=True)


def _estimate_small(model: Any) -> bool:
    total = sum(len(t.raw_data) for t in model.graph.initializer)
    return total < _TWO_GB // 2
