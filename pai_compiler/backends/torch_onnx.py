"""Export a torch module to ONNX with a dynamic batch dimension (legacy or dynamo exporter), atomically.

:func:`export_onnx` exports a model in eval mode with a dynamic batch
dimension (named ``"batch"``) on the single input ``"input"`` and the single
output ``"output"``.  Two exporters are supported:

* legacy TorchScript exporter (default, ``dynamo=False``): constant folding is
  disabled and the model is exported in ``TrainingMode.EVAL`` so initializer
  names equal the ``state_dict`` names and BatchNormalization nodes are kept;
* dynamo exporter (``dynamo=True``, needs ``onnxscript``) with
  ``optimize=False``.

A model that takes several inputs, or whose ``forward`` takes ``use_cache`` (a Hugging Face
model, which would trace a ``DynamicCache``), is exported with named inputs instead
(``named_inputs``: the graph's input names and example tensors, a dynamic batch on each), called
by keyword with ``use_cache=False``; every tensor of its output is an ONNX output
(``output``, ``output_1``, ...).

The file is written atomically (temporary file in the destination directory,
then :func:`os.replace`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
import inspect
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["export_onnx", "takes_use_cache", "INPUT_NAME", "OUTPUT_NAME", "BATCH_DIM_NAME"]

INPUT_NAME: str = "input"
OUTPUT_NAME: str = "output"
BATCH_DIM_NAME: str = "batch"

#: Batch size of the example input used for tracing.
_EXAMPLE_BATCH: int = 2
_EXAMPLE_SEED: int = 0

_NOISY_LOGGERS: tuple[str, ...] = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence warnings, Python-level stdout/stderr and exporter loggers."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    sink = io.StringIO()
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), _native_output_silenced():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _native_output_silenced() -> Iterator[None]:
    """Point file descriptors 1 and 2 at /dev/null: the TorchScript exporter's C++ side prints the
    whole graph when an op has no symbolic ("Torch IR graph at exception"), before paic falls back
    to the dynamo exporter; Python-level redirection does not reach it."""
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no usable descriptors (embedded interpreters): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            for fd in (1, 2):
                os.dup2(null.fileno(), fd)
            yield
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


@contextlib.contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    """Make ``nn.MultiheadAttention`` take its exportable (non fused) path."""
    backend = getattr(torch.backends, "mha", None)
    if backend is None:
        yield
        return
    previous = backend.get_fastpath_enabled()
    backend.set_fastpath_enabled(False)
    try:
        yield
    finally:
        backend.set_fastpath_enabled(previous)


def _strip_initializer_inputs(path: str) -> None:
    """Remove graph inputs that are initializers (``keep_initializers_as_inputs``)."""
    import onnx

    proto = onnx.load(path)
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [value for value in proto.graph.input if value.name not in initializers]
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
    onnx.save(proto, path)


def _example_input(input_shape: tuple[int, ...], index_entries: int | None) -> torch.Tensor:
    """A seeded example batch to trace with: N(0, 1) floats, or indices below ``index_entries``."""
    generator = torch.Generator().manual_seed(_EXAMPLE_SEED)
    if index_entries is None:
        return torch.randn((_EXAMPLE_BATCH, *input_shape), generator=generator)
    return torch.randint(0, index_entries, (_EXAMPLE_BATCH, *input_shape), generator=generator)


_WRAPPED = "model."


def _unwrap_initializer_names(path: str) -> None:
    """Initializers named ``model.<fqn>`` by the keyword wrapper get their module's own FQN back."""
    import onnx  # heavy: only an export loads it

    proto = onnx.load(path)
    renamed = {init.name: init.name[len(_WRAPPED):] for init in proto.graph.initializer if init.name.startswith(_WRAPPED)}
    taken = {init.name for init in proto.graph.initializer} | {v.name for v in proto.graph.input} | {n for node in proto.graph.node for n in node.output}
    renamed = {old: new for old, new in renamed.items() if new not in taken}  # never collide with another tensor's name
    if not renamed:
        return
    for init in proto.graph.initializer:
        init.name = renamed.get(init.name, init.name)
    for node in proto.graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    for value in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
        value.name = renamed.get(value.name, value.name)
    onnx.save(proto, path)


def takes_use_cache(model: nn.Module) -> bool:
    """Whether ``model.forward`` has a ``use_cache`` parameter (a Hugging Face model that would build a cache)."""
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class _ByKeyword(nn.Module):
    """``model(**{name: tensor}, use_cache=False)`` -> every tensor of its output, as a tuple the exporters take."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        self.by_keyword = all(name in params for name in self.names)  # else positional, in the graph's order
        self.extra = {"use_cache": False} if "use_cache" in params else {}

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.by_keyword:
            out = self.model(**dict(zip(self.names, tensors)), **self.extra)
        else:
            out = self.model(*tensors, **self.extra)
        return tuple(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def _run_named_exporter(model: nn.Module, named_inputs: Sequence[tuple[str, torch.Tensor]], path: str, *, opset: int) -> None:
    """The TorchScript exporter on the named inputs (dynamic batch on each) and every output tensor;
    the dynamo exporter where TorchScript has no symbolic for an op (GPT-2's mask builder: ``aten::diff``)."""
    names = [name for name, _ in named_inputs]
    examples = tuple(t for _, t in named_inputs)
    wrapper = _ByKeyword(model, names).eval()
    with torch.no_grad():
        outputs = wrapper(*examples)
    output_names = [OUTPUT_NAME] + [f"{OUTPUT_NAME}_{i}" for i in range(1, len(outputs))]
    axes = {name: {0: BATCH_DIM_NAME} for name in names} | {name: {0: BATCH_DIM_NAME} for name, t in zip(output_names, outputs) if t.dim()}
    try:
        with _quiet(), _mha_fastpath_disabled():
            torch.onnx.export(wrapper, examples, path, dynamo=False, verbose=False, do_constant_folding=False,
                              training=torch.onnx.TrainingMode.EVAL, keep_initializers_as_inputs=True, opset_version=opset,
                              input_names=names, output_names=output_names, dynamic_axes=axes)
        _strip_initializer_inputs(path)
        _unwrap_initializer_names(path)
        return
    except torch.onnx.errors.UnsupportedOperatorError:
        pass
    batch = torch.export.Dim(BATCH_DIM_NAME)
    with _quiet(), _mha_fastpath_disabled():
        torch.onnx.export(wrapper, examples, path, dynamo=True, optimize=False, external_data=False, verbose=False, opset_version=opset,
                          input_names=names, output_names=output_names, dynamic_shapes=(tuple({0: batch} for _ in examples),))  # one entry: *tensors
    _unwrap_initializer_names(path)


def _run_exporter(model: nn.Module, example: torch.Tensor, path: str, *, dynamo: bool, opset: int) -> None:
    """One ``torch.onnx.export`` call with paic's names and dynamic batch, quietly."""
    with _quiet(), _mha_fastpath_disabled():
        if dynamo:
            torch.onnx.export(
                model,
                (example,),
                path,
                dynamo=True,
                optimize=False,
                external_data=False,
                verbose=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim(BATCH_DIM_NAME)},),
            )
        else:
            torch.onnx.export(
                model,
                (example,),
                path,
                dynamo=False,
                verbose=False,
                do_constant_folding=False,
                training=torch.onnx.TrainingMode.EVAL,
                # Without this the exporter de-duplicates initializers by
                # value in eval mode (e.g. all BN weights that are still 1),
                # dropping state_dict names; see _strip_initializer_inputs.
                keep_initializers_as_inputs=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: BATCH_DIM_NAME}, OUTPUT_NAME: {0: BATCH_DIM_NAME}},
            )
    if not dynamo:
        _strip_initializer_inputs(path)


def export_onnx(
    model: nn.Module,
    input_shape: tuple[int, ...],
    path: str | os.PathLike[str],
    *,
    dynamo: bool = False,
    opset: int = 18,
    index_entries: int | None = None,
    named_inputs: Sequence[tuple[str, torch.Tensor]] | None = None,
) -> None:
    """Export ``model`` to ONNX at ``path`` with a dynamic batch dimension.

    Args:
        model: module to export; it is put in eval mode for the export and its
            previous training flag is restored afterwards.
        input_shape: input shape without the batch dimension, e.g. ``(3, 32, 32)``.
        path: destination ``.onnx`` file (written atomically).
        dynamo: use the dynamo-based exporter instead of the legacy one.
        opset: ONNX opset version.
        index_entries: the input is integer indices below this (an embedding model), not floats.
        named_inputs: (name, example batch) per model input: export with these names, by keyword
            (TorchScript exporter; ``input_shape``, ``dynamo`` and ``index_entries`` are then unused).
    """
    destination = Path(path)
    directory = destination.parent
    directory.mkdir(parents=True, exist_ok=True)
    example = _example_input(input_shape, index_entries)
    was_training = model.training
    model.eval()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        if named_inputs:
            _run_named_exporter(model, named_inputs, tmp_name, opset=opset)
        else:
            _run_exporter(model, example, tmp_name, dynamo=dynamo, opset=opset)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, destination)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    finally:
        model.train(was_training)
