"""Pass infrastructure: AnalysisPass, TransformPass, PassResult, AnalysisManager, PassManager.

A pass is a frozen dataclass whose fields are its options. Analyses are pure and cached by the
AnalysisManager, keyed on the pass instance and valid for one ``graph.version``. Transforms
return ``PassResult(modified, preserved)``, ``preserved`` naming analysis classes; the
PassManager invalidates every cached analysis not preserved, checks each transform's contract
(``requires`` -> PreconditionError; ``ensures``, the graph's verification and an honest
``modified`` -> PostconditionError) and wraps every failure with the pass history ("pass
'magnitude' after [erk{sparsity=0.9}]: ..."). ``Sequential`` runs passes in order as one step;
``Fixpoint`` reruns its body until it reports ``modified=False``, failing loudly (FixpointError)
when it has not converged within ``max_rounds``; ``iterate_to_fixpoint`` is that loop for
passes that iterate internally.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pai_compiler.errors import FixpointError, PaicError, PassError, PostconditionError, PreconditionError, UsageError
from pai_compiler.ir import Graph, to_text
from pai_compiler.pipeline import format_pass

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
    "Preserved",
    "Sequential",
    "Fixpoint",
    "iterate_to_fixpoint",
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
        return format_pass(self)


class AnalysisPass(Pass, Generic[T]):
    """A pure computation over a graph whose result the AnalysisManager caches."""

    kind: ClassVar[str] = "analysis"

    @abstractmethod
    def run(self, graph: Graph, am: AnalysisManager) -> T: ...


Preserved = frozenset[type[AnalysisPass[Any]]] | Literal["all"]
"""The analyses a transform leaves valid: their classes (subclasses included), or "all"."""


@dataclass(frozen=True)
class PassResult:
    """What a transform did: ``preserved`` names the analysis classes still valid (or "all")."""

    modified: bool
    preserved: Preserved = frozenset()
    report: Any = None  # what the pass found or decided (a typed record), kept in its PassRecord

    def __post_init__(self) -> None:
        if self.preserved == "all":
            return
        preserved = frozenset(self.preserved)
        wrong = [p for p in preserved if not (isinstance(p, type) and issubclass(p, AnalysisPass))]
        if wrong:
            raise TypeError(f"PassResult.preserved names AnalysisPass classes or 'all', got {wrong!r}")
        object.__setattr__(self, "preserved", preserved)


class TransformPass(Pass):
    """Mutates the graph in place through Graph methods."""

    kind: ClassVar[str] = "transform"

    def requires(self, graph: Graph, am: AnalysisManager) -> None:
        """Pre-condition (on the graph and what earlier passes provided, e.g. an ``Allocation``);
        raise a PaicError with a clear message when it does not hold."""

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

    def invalidate(self, preserved: Preserved = frozenset()) -> None:
        """Drop cached results not preserved; re-stamp preserved ones with the current version."""
        kept = tuple(preserved) if preserved != "all" else (AnalysisPass,)
        for analysis in list(self._cache):
            if isinstance(analysis, kept):
                self._cache[analysis] = (self.graph.version, self._cache[analysis][1])
            else:
                del self._cache[analysis]


class Instrument:
    """Hooks around every pass (timing, IR dumps)."""

    def before_pass(self, pass_: Pass, graph: Graph) -> None: ...

    def after_pass(self, pass_: Pass, graph: Graph, seconds: float) -> None: ...


class TimingInstrument(Instrument):
    """Collects (spec, seconds) per leaf pass, in run order."""

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
    """One step of a run; a Sequential's or Fixpoint's step holds its passes' records in order."""

    spec: str
    kind: str
    seconds: float
    modified: bool
    result: Any = None  # analysis result, if the pass is an analysis
    report: Any = None  # a transform's PassResult.report
    children: tuple[PassRecord, ...] = ()

    def leaves(self) -> Iterator[PassRecord]:
        """The records of the analyses and transforms that ran, depth first, in run order."""
        if self.kind in ("sequential", "fixpoint"):
            for child in self.children:
                yield from child.leaves()
        else:
            yield self


@dataclass(frozen=True)
class Sequential(Pass):
    """A pass made of passes, run in order as one step of a pipeline; modified if any was."""

    name: ClassVar[str] = "sequential"
    kind: ClassVar[str] = "sequential"
    passes: tuple[Pass, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "passes", tuple(self.passes))

    def spec(self) -> str:
        return f"sequential({', '.join(p.spec() for p in self.passes)})"


@dataclass(frozen=True)
class Fixpoint(Pass):
    """Reruns ``body`` until it reports ``modified=False``; FixpointError after ``max_rounds``."""

    name: ClassVar[str] = "fixpoint"
    kind: ClassVar[str] = "fixpoint"
    body: Pass
    max_rounds: int = 16

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise UsageError(f"fixpoint: max_rounds must be a positive integer, got {self.max_rounds}")

    def spec(self) -> str:
        return f"fixpoint({self.body.spec()}, max_rounds={self.max_rounds})"


def iterate_to_fixpoint(step: Callable[[], bool], *, max_rounds: int, what: str) -> int:
    """Call ``step`` until it reports no change; return how many calls changed something.

    Raises FixpointError when the ``max_rounds``-th call still changed something: an iteration
    that has not converged is never cut off silently."""
    for rounds in range(max_rounds):
        if not step():
            return rounds
    raise FixpointError(f"{what} still changed after {max_rounds} rounds: no fixpoint")


class PassManager:
    """Runs a sequence of passes over one graph (instruments see each leaf pass)."""

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
        history: list[str] = []  # the leaf passes run so far, for error messages
        return [self._step(pass_, graph, am, history) for pass_ in self.passes]

    def _step(self, pass_: Pass, graph: Graph, am: AnalysisManager, history: list[str]) -> PassRecord:
        if isinstance(pass_, Sequential):
            return self._sequential(pass_, graph, am, history)
        if isinstance(pass_, Fixpoint):
            return self._fixpoint(pass_, graph, am, history)
        spec = pass_.spec()
        for inst in self.instruments:
            inst.before_pass(pass_, graph)
        start = time.perf_counter()
        try:
            record = self._run_leaf(pass_, spec, graph, am, history, start)
        except PassError:
            raise
        except Exception as exc:  # a PaicError keeps its exit code; a bug or unexpected input gets 1
            raise _wrap(exc, spec, history) from exc
        for inst in self.instruments:
            inst.after_pass(pass_, graph, record.seconds)
        history.append(spec)
        return record

    def _sequential(self, seq: Sequential, graph: Graph, am: AnalysisManager, history: list[str]) -> PassRecord:
        start = time.perf_counter()
        children = tuple(self._step(p, graph, am, history) for p in seq.passes)
        modified = any(c.modified for c in children)
        return PassRecord(seq.spec(), "sequential", time.perf_counter() - start, modified, children=children)

    def _fixpoint(self, fix: Fixpoint, graph: Graph, am: AnalysisManager, history: list[str]) -> PassRecord:
        start = time.perf_counter()
        rounds: list[PassRecord] = []

        def one_round() -> bool:
            rounds.append(self._step(fix.body, graph, am, history))
            return rounds[-1].modified

        try:
            iterate_to_fixpoint(one_round, max_rounds=fix.max_rounds, what=f"'{fix.body.spec()}'")
        except FixpointError as exc:
            raise _wrap(exc, fix.spec(), history) from exc
        modified = any(r.modified for r in rounds)
        return PassRecord(fix.spec(), "fixpoint", time.perf_counter() - start, modified, children=tuple(rounds))

    def _run_leaf(self, pass_: Pass, spec: str, graph: Graph, am: AnalysisManager, history: list[str], start: float) -> PassRecord:
        if isinstance(pass_, AnalysisPass):
            result = am.get(pass_)
            return PassRecord(spec, "analysis", time.perf_counter() - start, False, result)
        if not isinstance(pass_, TransformPass):
            raise TypeError(f"{type(pass_).__name__} is neither an AnalysisPass nor a TransformPass")
        _check(lambda g: pass_.requires(g, am), graph, spec, history, PreconditionError)
        version = graph.version
        result = pass_.run(graph, am)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {spec!r} returned {type(result).__name__}, expected PassResult")
        if not result.modified and graph.version != version:
            raise _wrap(TypeError(f"pass {spec!r} reported modified=False but changed the graph"), spec, history, PostconditionError)
        _check(pass_.ensures, graph, spec, history, PostconditionError)
        am.invalidate(result.preserved if result.modified else "all")
        if self.verify_each and result.modified:
            _check(Graph.verify, graph, spec, history, PostconditionError)
        return PassRecord(spec, "transform", time.perf_counter() - start, result.modified, report=result.report)


def _check(condition: Callable[[Graph], None], graph: Graph, spec: str, history: list[str], error: type[PassError]) -> None:
    """Run a contract check; any failure becomes ``error`` with the pass history."""
    try:
        condition(graph)
    except Exception as exc:
        raise _wrap(exc, spec, history, error) from exc


def _wrap(exc: BaseException, spec: str, history: list[str], error: type[PassError] = PassError) -> PassError:
    after = f" after [{', '.join(history)}]" if history else ""
    message = str(exc) or type(exc).__name__
    err = error(f"pass '{spec}'{after}: {message}", pass_name=spec, history=tuple(history))
    err.exit_code = type(exc).exit_code if isinstance(exc, PaicError) else 1
    return err
