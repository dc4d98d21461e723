"""Where the full ``paic audit`` spends its CPU: each phase timed once in one process.

Phases: third-party imports (numpy, sympy, typer, rich), paic's imports, the ONNX load,
``import torch``, the exact and the DPaI float64 ones-forwards, the reachability sweep, and the
whole ``audit_graph`` once more with torch warm. CPU seconds (``time.process_time``); run with
``OMP_NUM_THREADS=1`` for the issue's single-thread numbers.

    OMP_NUM_THREADS=1 python benchmarks/audit_phases.py MODEL.onnx [MODEL.onnx ...]
"""
from __future__ import annotations

import sys
import time

__all__ = ["phases", "main"]


def phases(path: str) -> dict[str, float]:
    """CPU seconds of each phase of a full audit of ``path`` (the first call pays the imports)."""
    clock = time.process_time
    marks = [("start", clock())]
    import numpy  # noqa: F401
    import rich.console  # noqa: F401
    import sympy  # noqa: F401
    import typer  # noqa: F401

    marks.append(("third-party imports", clock()))
    from pai_compiler.api import load_model
    from pai_compiler.audit import audit_graph
    from pai_compiler.passes.analysis import node_path
    from pai_compiler.passes.analysis.reachability import weight_reachability
    from pai_compiler.passes.analysis.bindings import parse_bind, sample_bindings

    marks.append(("paic imports", clock()))
    graph = load_model(path)
    marks.append(("load", clock()))
    import torch  # heavy: the path analysis needs it; timed as its own phase

    marks.append(("import torch", clock()))
    bind = sample_bindings(graph, parse_bind(""))
    with torch.no_grad():
        node_path._log_paths(graph, bind, "exact")
        marks.append(("log P exact", clock()))
        node_path._log_paths(graph, bind, "ref")
        marks.append(("log P DPaI", clock()))
    weight_reachability(graph, bind, live={})
    marks.append(("reachability", clock()))
    audit_graph(graph, paths=True)
    marks.append(("whole audit_graph", clock()))
    return {name: now - before for (_, before), (name, now) in zip(marks, marks[1:])}


def main(argv: list[str] | None = None) -> int:
    for path in argv if argv is not None else sys.argv[1:]:
        got = phases(path)
        print(f"{path}: " + ", ".join(f"{name} {seconds:.2f}" for name, seconds in got.items()) + " (CPU s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
