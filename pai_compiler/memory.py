"""Handing memory back to the OS between the phases of a run (lower peak RSS on big models).

* :func:`trim_heap`: glibc keeps freed heap pages (``malloc_trim(0)`` returns them); a no-op
  on other C libraries and platforms.
* :func:`release_all`: that, and dropping the resident pages of the memory-mapped model files
  (clean file pages, read back from the page cache on the next access; ``onnx_wire``).
"""
from __future__ import annotations

import sys

__all__ = ["trim_heap", "release_all"]


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc's ``malloc_trim``)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


def release_all() -> None:
    """After a phase that read every weight and allocated a lot (an audit, a criterion)."""
    from pai_compiler.onnx_wire import release_mapped_pages

    trim_heap()
    release_mapped_pages()
