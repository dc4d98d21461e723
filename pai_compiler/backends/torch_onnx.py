"""Export a torch module to ONNX with a dynamic batch dimension (legacy or dynamo exporter), atomically.

:func:`export_onnx` exports a model in eval mode with a dynamic batch
dimension (named ``"batch"``) on the single input ``"input"`` and the single
output ``"output"``.  Two exporters are supported:

* legacy TorchScript exporter (default, ``dynamo=False``): constant folding is
  disabled and the model is exported in ``TrainingMode.EVAL`` so initializer
  names equal the ``state_dict`` names and BatchNormalization nodes are kept;
* dynamo exporter (``dynamo=True``, needs ``onnxscript``) with
  ``optimize=False``.

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
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

__all__ = ["export_onnx", "INPUT_NAME", "OUTPUT_NAME", "BATCH_DIM_NAME"]

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
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


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
        _run_exporter(model, example, tmp_name, dynamo=dynamo, opset=opset)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, destination)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    finally:
        model.train(was_training)
