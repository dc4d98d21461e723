"""Progress bars: rich when enabled, a do-nothing stand-in otherwise (same methods)."""
from __future__ import annotations

from typing import Any

__all__ = ["NoProgress", "progress_bar"]


class NoProgress:
    """Accepts every call a rich ``Progress`` gets in paic and does nothing."""

    console: Any = None

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None

    def advance(self, *args: Any, **kwargs: Any) -> None:
        return None


def progress_bar(enabled: bool, console: Any = None) -> Any:
    """A rich Progress (description, bar, n/m, elapsed, ETA) or a NoProgress."""
    if not enabled:
        return NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=console)
