"""Progress bars: rich when enabled, a do-nothing stand-in otherwise (same methods), and
``metric_bar``, the bar long phases show on stderr (rate and live metrics, terminals only).

``metric_bar`` is what every long phase of the compiler draws (load, audit, DPaI steps, SynFlow
rounds, NPB layers, compaction and kernel timing). Drawing never changes a result: the phase
calls ``update(done, metrics)`` and reads nothing back. ``delay`` keeps quick work silent (the
bar appears only once an update comes that late), ``timed`` keeps rich's refresh thread off
while the work around the bar is being timed (it redraws on updates only).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["NoProgress", "progress_bar", "metric_bar", "MetricUpdate", "bars_wanted", "Phases", "PHASE_DELAY"]

#: seconds a phase of unknown length runs before its bar appears (small models draw nothing)
PHASE_DELAY = 0.5

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


def bars_wanted(*, quiet: bool = False, json_output: bool = False) -> bool:
    """Whether a command's long phases may draw bars: never under ``-q`` or ``--json`` (each bar still
    checks that stderr is a terminal)."""
    return not quiet and not json_output


def progress_bar(enabled: bool, console: Any = None) -> Any:
    """A rich Progress (description, bar, n/m, elapsed, ETA) or a NoProgress."""
    if not enabled:
        return NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=console)


class _LazyBar:
    """The rich bar behind ``metric_bar``'s ``update``: started by the first update at least ``delay`` s after entry."""

    def __init__(self, stack: contextlib.ExitStack, console: Any, label: str, total: int, unit: str, delay: float, timed: bool) -> None:
        self.stack, self.console, self.label, self.total, self.unit = stack, console, label, max(total, 1), unit
        self.delay, self.timed, self.entered = delay, timed, time.monotonic()
        self.bar: Any = None
        self.task: Any = None
        self.metrics = ""

    def _start(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.text import Text

        unit = self.unit

        class Rate(ProgressColumn):
            def render(self, task: Any) -> Text:
                speed = task.finished_speed or task.speed
                return Text("" if not speed else f"{speed:,.1f} {unit}/s" if speed < 100 else f"{speed:,.0f} {unit}/s")

        columns = (TextColumn(self.label), BarColumn(), MofNCompleteColumn(), Rate(), TextColumn("{task.fields[metrics]}"),
                   TimeElapsedColumn(), TimeRemainingColumn())
        self.bar = self.stack.enter_context(Progress(*columns, console=self.console, transient=False, auto_refresh=not self.timed))
        self.task = self.bar.add_task(self.label, total=self.total, metrics=self.metrics)
        # elapsed counts from the phase's start, not from the (delayed) first draw
        self.bar.tasks[0].start_time = self.bar.get_time() - (time.monotonic() - self.entered)

    def update(self, done: int, metrics: str) -> None:
        self.metrics = metrics or self.metrics
        if self.bar is None:
            if time.monotonic() - self.entered < self.delay:
                return
            self._start()
        self.bar.update(self.task, completed=done, metrics=self.metrics, refresh=self.timed)


@contextlib.contextmanager
def metric_bar(enabled: bool, label: str, total: int, unit: str = "steps", console: Any = None, *,
               delay: float = 0.0, timed: bool = False) -> Iterator[MetricUpdate | None]:
    """A rich bar on stderr: label, bar, n/m, ``unit``/s, live metrics, elapsed, ETA.

    Yields ``update(done, metrics)``, or None when disabled or stderr is no terminal (nothing is
    drawn then: pipes, ``--json`` runs and ``-q`` stay clean). ``delay``: seconds of work before
    the bar may appear (an update before that draws nothing; quick phases stay silent).
    ``timed``: no refresh thread, redraw on each update (the phase is timing code).
    """
    if not enabled:
        yield None
        return
    from rich.console import Console  # rich loads only when a bar may be drawn

    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    with contextlib.ExitStack() as stack:
        yield _LazyBar(stack, console, label, total, unit, delay, timed).update


class Phases:
    """Feeds one ``metric_bar`` through named phases: ``done`` counts units over all phases (capped at
    ``total``), the metrics read ``phase · note``; a None ``update`` (no bar) makes every call free."""

    def __init__(self, update: MetricUpdate | None, total: int, every: int = 1) -> None:
        self.update, self.total, self.every = update, total, max(every, 1)
        self.done, self.phase, self.note = 0, "", ""

    def begin(self, phase: str, note: str = "") -> None:
        """Start ``phase`` (its note replaces the last one when given)."""
        self.phase, self.note = phase, note or self.note
        self._emit()

    def tick(self, count: int = 1) -> None:
        """``count`` more units done (drawn every ``every`` units)."""
        before, self.done = self.done, self.done + count
        if self.update is not None and before // self.every != self.done // self.every:
            self._emit()

    def finish(self, note: str = "") -> None:
        """The last update: all ``total`` units done, with ``note``."""
        self.done, self.note = self.total, note or self.note
        self._emit()

    def _emit(self) -> None:
        if self.update is not None:
            self.update(min(self.done, self.total), " · ".join(part for part in (self.phase, self.note) if part))
