"""Error types of paic: every user-facing failure is one of these, with a one-line message."""
from __future__ import annotations

__all__ = [
    "PaicError",
    "ModelError",
    "UsageError",
    "PassError",
    "PreconditionError",
    "PostconditionError",
    "FixpointError",
    "VerificationError",
]


class PaicError(Exception):
    """Base class: a failure that the CLI reports as one line and exit code 1."""

    exit_code = 1


class ModelError(PaicError):
    """The model cannot be read or lowered (malformed file, unsupported construct)."""


class UsageError(PaicError):
    """A bad flag or option value (CLI exit code 2)."""

    exit_code = 2


class VerificationError(PaicError):
    """An IR invariant does not hold (a bug in a pass or frontend)."""


class PassError(PaicError):
    """A pass failed; the message names the pass and the passes that ran before it."""

    def __init__(self, message: str, *, pass_name: str = "", history: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.pass_name = pass_name
        self.history = history


class PreconditionError(PassError):
    """A transform's ``requires`` does not hold: the graph is not one the pass can run on."""


class PostconditionError(PassError):
    """A transform's ``ensures`` does not hold after it ran: a bug in the pass."""


class FixpointError(PaicError):
    """An iteration that must reach a fixpoint was still changing after its round limit."""
