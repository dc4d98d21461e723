"""Pass infrastructure: AnalysisPass, TransformPass, PassResult, AnalysisManager, PassManager.

A pass is a frozen dataclass whose fields are its options. Analyses are pure and cached by the
AnalysisManager, keyed on the pass instance and valid for one ``graph.version``. Transforms
return ``PassResult(modified, preserved)``; the PassManager invalidates every cached analysis
not in ``preserved``, verifies the graph after each transform, and wraps failures with the
pass history ("... in 'magnitude' after ['erk{sparsity=0.9}']").
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pai_compiler.errors import PaicError, PassError
from pai_compiler.ir import Graph, to_text

__all__ = [
    "Pass",
    "AnalysisPass",
    "TransformPass",
    "PassResult",
    "RunContext",
    "AnalysisManager",
    "Instrument",
    "TimingInstrument",
    "PrintIRInstrument",
    "PassManager",
    "PassRecord",
]

T = TypeVar("T")


@dataclass
class RunContext:
    """Settings shared by every pass of one run (not per-pass options)."""

    seed: int = 0
    device: str = "cpu"
    progress: bool = False
    data: Any = None  # a pai_compiler.lab.data.Batch for data-driven criteria, or None
    extra: dict[str, Any] = field(default_factory=dict)


class Pass(ABC):
    """Common base: ``name`` is the kebab-case pipeline name; dataclass fields are options."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""

    def spec(self) -> str:
        from pai_compiler.pipeline import format_pass

        return format_pass(self)


class AnalysisPass(Pass, Generic[T]):
    """A pure computation over a graph whose result the AnalysisManager caches."""

    kind: ClassVar[str] = "analysis"

    @abstractmethod
    def run(self, graph: Graph, am: AnalysisManager) -> T: ...


@dataclass(frozen=True)
class PassResult:
    """What a transform did: ``preserved`` names the analyses still valid ("all" or names)."""

    modified: bool
    preserved: frozenset[str] | Literal["all"] = frozenset()
    report: Any = None  # what the pass found or decided (a typed record), kept in its PassRecord


class TransformPass(Pass):
    """Mutates the graph in place through Graph methods."""

    kind: ClassVar[str] = "transform"

    def requires(self, graph: Graph) -> None:
        """Pre-condition; raise a PaicError with a clear message when it does not hold."""

    @abstractmethod
    def run(self, graph: Graph, am: AnalysisManager) -> PassResult: ...

    def ensures(self, graph: Graph) -> None:
        """Post-condition, checked after ``run``."""


class AnalysisManager:
    """Computes analyses on demand and caches them per (pass instance, graph version).

    It also holds the typed results that transforms hand to the passes after them (e.g. an
    allocation's keep counts): one value per type, the latest wins, kept until the run ends;
    and the run's warnings (``warn``), in the order the passes gave them.
    """

    def __init__(self, graph: Graph, context: RunContext | None = None) -> None:
        self.graph = graph
        self.context = context or RunContext()
        self._cache: dict[AnalysisPass[Any], tuple[int, Any]] = {}
        self._provided: dict[type, Any] = {}
        self.warnings: list[str] = []
        self.computed = 0  # how many times an analysis actually ran (for tests and timing)

    def warn(self, message: str) -> None:
        """Record a warning for the user (the faces print it and put it in the report)."""
        self.warnings.append(message)

    def provide(self, value: object) -> None:
        """Hand ``value`` to the passes that follow, keyed by its type (replacing an earlier one)."""
        self._provided[type(value)] = value

    def provided(self, kind: type[T]) -> T | None:
        """The latest value of type ``kind`` a pass provided in this run, or None."""
        value = self._provided.get(kind)
        return value if isinstance(value, kind) else None

    def get(self, analysis: AnalysisPass[T]) -> T:
        hit = self._cache.get(analysis)
        if hit is not None and hit[0] == self.graph.version:
            return hit[1]
        result = analysis.run(self.graph, self)
        self.computed += 1
        self._cache[analysis] = (self.graph.version, result)
        return result

    def invalidate(self, preserved: frozenset[str] | Literal["all"] = frozenset()) -> None:
        """Drop cached results not preserved; re-stamp preserved ones with the current version."""
        for analysis in list(self._cache):
            if preserved == "all" or analysis.name in preserved:
                self._cache[analysis] = (self.graph.version, self._cache[analysis][1])
            else:
                del self._cache[analysis]


class Instrument:
    """Hooks around every pass (timing, IR dumps)."""

    def before_pass(self, pass_: Pass, graph: Graph) -> None: ...

    def after_pass(self, pass_: Pass, graph: Graph, seconds: float) -> None: ...


class TimingInstrument(Instrument):
    def __init__(self) -> None:
        self.timings: list[tuple[str, float]] = []

    def after_pass(self, pass_: Pass, graph: Graph, seconds: float) -> None:
        self.timings.append((pass_.spec(), seconds))


class PrintIRInstrument(Instrument):
    """``--print-ir-after-all``: write the IR text after each pass to ``stream``."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def after_pass(self, pass_: Pass, graph: Graph, seconds: float) -> None:
        self.stream.write(f"// ----- IR after {pass_.spec()} -----\n{to_text(graph)}")


@dataclass(frozen=True)
class PassRecord:
    spec: str
    kind: str
    seconds: float
    modified: bool
    result: Any = None  # analysis result, if the pass is an analysis
    report: Any = None  # a transform's PassResult.report


class PassManager:
    """Runs a sequence of passes over one graph."""

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        verify_each: bool = True,
        instruments: Sequence[Instrument] = (),
    ) -> None:
        self.passes = list(passes)
        self.verify_each = verify_each
        self.instruments = list(instruments)

    def run(self, graph: Graph, am: AnalysisManager | None = None) -> list[PassRecord]:
        am = am or AnalysisManager(graph)
        history: list[str] = []
        records: list[PassRecord] = []
        for pass_ in self.passes:
            spec = pass_.spec()
            for inst in self.instruments:
                inst.before_pass(pass_, graph)
            start = time.perf_counter()
            try:
                record = self._run_one(pass_, spec, graph, am, start)
            except PassError:
                raise
            except PaicError as exc:
                raise _wrap(exc, spec, history, type(exc).exit_code) from exc
            except Exception as exc:  # a bug or an unexpected input: keep the history
                raise _wrap(exc, spec, history, 1) from exc
            for inst in self.instruments:
                inst.after_pass(pass_, graph, record.seconds)
            records.append(record)
            history.append(spec)
        return records

    def _run_one(self, pass_: Pass, spec: str, graph: Graph, am: AnalysisManager, start: float) -> PassRecord:
        if isinstance(pass_, AnalysisPass):
            result = am.get(pass_)
            return PassRecord(spec, "analysis", time.perf_counter() - start, False, result)
        if not isinstance(pass_, TransformPass):
            raise TypeError(f"{type(pass_).__name__} is neither an AnalysisPass nor a TransformPass")
        pass_.requires(graph)
        version = graph.version
        result = pass_.run(graph, am)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {spec!r} returned {type(result).__name__}, expected PassResult")
        if not result.modified and graph.version != version:
            raise TypeError(f"pass {spec!r} reported modified=False but changed the graph")
        pass_.ensures(graph)
        am.invalidate(result.preserved if result.modified else "all")
        if self.verify_each and result.modified:
            graph.verify()
        return PassRecord(spec, "transform", time.perf_counter() - start, result.modified, report=result.report)


def _wrap(exc: BaseException, spec: str, history: list[str], exit_code: int) -> PassError:
    after = f" after [{', '.join(history)}]" if history else ""
    message = str(exc) or type(exc).__name__
    err = PassError(f"pass '{spec}'{after}: {message}", pass_name=spec, history=tuple(history))
    err.exit_code = exit_code
    return err
