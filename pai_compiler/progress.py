"""Progress bars: rich when enabled, a do-nothing stand-in otherwise (same methods), and
``metric_bar``, the bar long passes show on stderr (rate and live metrics, terminals only)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["NoProgress", "progress_bar", "metric_bar", "MetricUpdate"]

#: ``update(done, metrics)``: ``done`` units finished, ``metrics`` the live text ("" keeps the last)
MetricUpdate = Callable[[int, str], None]


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


@contextlib.contextmanager
def metric_bar(enabled: bool, label: str, total: int, unit: str = "steps", console: Any = None) -> Iterator[MetricUpdate | None]:
    """A rich bar on stderr: label, bar, n/m, ``unit``/s, live metrics, elapsed, ETA.

    Yields ``update(done, metrics)``, or None when disabled or stderr is no terminal (nothing is
    drawn then: pipes, ``--json`` runs and ``-q`` stay clean).
    """
    if not enabled:
        yield None
        return
    from rich.console import Console  # rich loads only when a bar is drawn
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.text import Text

    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield None
        return

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text("" if not speed else f"{speed:,.1f} {unit}/s" if speed < 100 else f"{speed:,.0f} {unit}/s")

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), Rate(), TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(label, total=max(total, 1), metrics="")

        def update(done: int, metrics: str) -> None:
            if metrics:
                bar.update(task, completed=done, metrics=metrics)
            else:
                bar.update(task, completed=done)

        yield update
