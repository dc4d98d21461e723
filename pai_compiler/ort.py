"""onnxruntime sessions with providers chosen from what this install offers.

``onnxruntime`` (extra ``cpu``) and ``onnxruntime-gpu`` (extra ``gpu``) both provide the
module; we ask ``get_available_providers()`` and prefer CUDA, then CPU.
"""
from __future__ import annotations

import os
from typing import Any

from pai_compiler.errors import PaicError

__all__ = ["providers", "session"]

_PREFERENCE = ("CUDAExecutionProvider", "CPUExecutionProvider")


def providers(device: str = "auto") -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise PaicError("onnxruntime is not installed: pip install 'paic[cpu]' (or 'paic[gpu]', never both)") from None
    available = ort.get_available_providers()
    wanted = ["CPUExecutionProvider"] if device == "cpu" else list(_PREFERENCE)
    chosen = [p for p in wanted if p in available]
    return chosen or ["CPUExecutionProvider"]


def session(model: Any, *, device: str = "auto", threads: int | None = 1) -> Any:
    """An InferenceSession on a path or ModelProto (single-threaded by default: reproducible timings)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    source = model if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    return ort.InferenceSession(str(source) if isinstance(source, os.PathLike) else source, sess_options=opts, providers=providers(device))
