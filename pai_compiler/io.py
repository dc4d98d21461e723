"""File helpers: atomic writes (temp file in the target folder, then ``os.replace``)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pai_compiler.errors import PaicError, UsageError

__all__ = ["atomic_write", "check_output_path", "save_npz_atomic", "save_torch_atomic", "open_npz"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path``, on failure it vanishes."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise PaicError(f"cannot write {target}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise PaicError(f"cannot write {target}: folder {folder} is not writable")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:  # mkstemp makes the file 0600; give it the mode a plain open() would (0666 & ~umask)
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_path(out: str | os.PathLike[str], inputs: list[str | os.PathLike[str]], *, force: bool) -> Path:
    """Refuse to overwrite an input (unless ``force``) or to write into a missing folder."""
    out_p = Path(out)
    for inp in inputs:
        try:
            same = out_p.exists() and Path(inp).exists() and os.path.samefile(out_p, inp)
        except OSError:
            same = False
        if same or out_p.resolve() == Path(inp).resolve():
            if not force:
                raise UsageError(f"output {out_p} is the input file; refusing to overwrite it (use --force)")
    if out_p.is_dir():
        raise PaicError(f"output {out_p} is a directory")
    parent = out_p.parent if str(out_p.parent) else Path(".")
    if not parent.is_dir():
        raise PaicError(f"cannot write {out_p}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PaicError(f"cannot write {out_p}: folder {parent} is not writable")
    return out_p


def save_npz_atomic(path: str | os.PathLike[str], arrays: dict[str, object]) -> None:
    """``np.savez_compressed`` written atomically (a file handle: savez would append ``.npz`` to the temp name)."""
    import numpy as np

    with atomic_write(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]


def save_torch_atomic(path: str | os.PathLike[str], obj: object) -> None:
    """``torch.save`` written atomically and byte-deterministically.

    Through a file handle, not the temp path: torch names the zip's records after the file it is
    given, and the temp name is random."""
    import torch

    with atomic_write(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


@contextlib.contextmanager
def open_npz(path: str | os.PathLike[str], *, fmt: str, what: str, hint: str) -> Iterator[Any]:
    """Open a paic ``.npz`` whose ``format`` entry is ``fmt``; every failure is a one-line UsageError
    naming ``what`` (e.g. "AutoSparse predictor") and, for a missing or foreign file, ``hint``.
    Errors raised while the caller reads the entries (a missing key) are reported the same way."""
    import numpy as np

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{what} {file} not found ({hint})")
    try:
        with np.load(file, allow_pickle=False) as z:
            if "format" not in z.files or str(z["format"]) != fmt:
                raise UsageError(f"{file} is not an {what} ({fmt}); {hint}")
            yield z
    except UsageError:
        raise
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise UsageError(f"cannot read {what} {file}: {exc}") from None
