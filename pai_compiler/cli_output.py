"""What the ``paic`` commands print and write: the JSON report documents and the rich tables.

``optimize_report`` and ``compact_summary`` build the stable JSON documents (``--report``);
``render_*`` print the tables; ``audit_totals`` is the audit's totals of a graph. Heavy modules
are imported inside the functions, so ``paic --help`` stays fast.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pai_compiler._version import __version__

if TYPE_CHECKING:
    from pai_compiler.passes.transform.dead_node_elim import CompactReport

__all__ = ["compact_summary", "render_compact", "render_kept_dead", "audit_totals", "layer_rows", "optimize_report",
           "render_optimize", "render_compact_written", "fmt"]


def compact_summary(masked: dict[str, Any], graph: Any, report: CompactReport) -> dict[str, Any]:
    """MACs dense -> nonzero -> compact and parameters before/after dead-node elimination."""
    after = audit_totals(graph)
    return {
        "params_before": masked["params"], "nonzero_params_before": masked["nonzero_params"],
        "params_after": after["params"], "nonzero_params_after": after["nonzero_params"],
        "macs_dense": masked.get("macs_dense"), "macs_nonzero": masked.get("macs_nonzero"),
        "macs_effective": masked.get("macs_effective"), "macs_compact": after.get("macs_dense"),
        "macs_compact_nonzero": after.get("macs_nonzero"),
        "layers": [layer.as_dict() for layer in report.layers],
        "folds": [fold.as_dict() for fold in report.folds], "kept_dead_channels": dict(report.kept_dead_channels),
    }


def render_compact(console: Any, doc: dict[str, Any], out: str, *, layers: bool = True) -> None:
    from rich.table import Table

    if layers and doc["layers"]:
        table = Table(title="paic compact — channels per layer (out, in)", title_justify="left")
        for col in ("layer", "op", "out", "in", "shape"):
            table.add_column(col, justify="left" if col in ("layer", "op") else "right")
        for row in doc["layers"]:
            pair = lambda key: f"{row[key][0]} → {row[key][1]}" if key in row else "-"  # noqa: E731
            table.add_row(row["name"], row["op"], pair("out"), pair("in"), "×".join(map(str, row.get("shape_after", row["shape_before"]))))
        console.print(table)
    console.print(f"MACs: dense {fmt(doc['macs_dense'])} → nonzero {fmt(doc['macs_nonzero'])} → compact {fmt(doc['macs_compact'])} "
                  f"(compact nonzero {fmt(doc['macs_compact_nonzero'])}, effective {fmt(doc['macs_effective'])})")
    console.print(f"parameters: {fmt(doc['params_before'])} → compact {fmt(doc['params_after'])} "
                  f"(nonzero {fmt(doc['nonzero_params_before'])} → {fmt(doc['nonzero_params_after'])}); "
                  f"{len(doc['folds'])} constant fold(s) -> wrote compact model {out}")


def render_kept_dead(console: Any, report: CompactReport, top: int = 12) -> None:
    """``--explain``: dead channels that stayed, by reason, then the nodes that kept the most."""
    from rich.table import Table

    if not report.kept_dead_channels:
        console.print("explain: no dead channel was kept (every remaining channel is on an input->output path)")
        return
    table = Table(title="paic compact --explain — dead channels kept, by reason", title_justify="left")
    table.add_column("reason")
    table.add_column("channels", justify="right")
    for reason, count in sorted(report.kept_dead_channels, key=lambda item: -item[1]):
        table.add_row(reason, f"{count:,}")
    console.print(table)
    sources = sorted(report.kept_dead_sources, key=lambda item: -item[1])
    table = Table(title=f"the {min(top, len(sources))} nodes that kept the most", title_justify="left")
    table.add_column("node: reason")
    table.add_column("channels", justify="right")
    for source, count in sources[:top]:
        table.add_row(source, f"{count:,}")
    console.print(table)


def audit_totals(graph: Any, paths: bool = True, progress: bool = False) -> dict[str, Any]:
    """The audit totals of ``graph`` (path and node counts null with ``paths=False``; ``progress``: bars on a terminal)."""
    from pai_compiler.audit import audit_graph
    from pai_compiler.memory import release_all

    doc = audit_graph(graph, paths=paths, progress=progress)
    release_all()  # the audit read every weight and allocated; what comes next needs memory, not those pages
    return dict(doc["totals"])


def layer_rows(graph: Any) -> list[dict[str, Any]]:
    from pai_compiler.ir import format_shape

    rows = []
    for p in graph.prunable_params():
        rows.append({"name": p.name, "op": graph.param_users(p)[0].kind.value, "shape": format_shape(p.shape),
                     "params": p.numel, "kept": p.kept(), "density": p.kept() / p.numel if p.numel else 1.0})
    return rows


def optimize_report(result: Any, before: dict[str, Any], after: dict[str, Any], model: str, out: str, warnings: list[str]) -> dict[str, Any]:
    return {
        "model": model,
        "output": out,
        "pipeline": result.pipeline,
        "paic_version": __version__,
        "passes": [{"pass": r.spec, "seconds": round(r.seconds, 4)} for r in result.records],
        "excluded": result.excluded,
        "before": before,
        "after": after,
        "layers": layer_rows(result.graph),
        "warnings": warnings,
        **({"frontend": result.graph.meta.get("frontend")} if result.graph.meta.get("source_format") == "torch" else {}),
    }


def render_optimize(console: Any, result: Any, before: dict[str, Any], after: dict[str, Any], out: str, timings: list[tuple[str, float]],
                     warnings: list[str]) -> None:
    from rich.table import Table

    table = Table(title=f"paic optimize — {result.pipeline}", title_justify="left")
    for col, justify in (("layer", "left"), ("op", "left"), ("shape", "left"), ("params", "right"), ("kept", "right"), ("density", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in layer_rows(result.graph):
        table.add_row(row["name"], row["op"], row["shape"], f"{row['params']:,}", f"{row['kept']:,}", f"{row['density']:.4f}")
    console.print(table)
    totals = Table(title="totals", title_justify="left")
    totals.add_column("metric")
    totals.add_column("before", justify="right")
    totals.add_column("after", justify="right")
    for key in before:
        totals.add_row(key, fmt(before[key]), fmt(after.get(key)))
    console.print(totals)
    for name, seconds in timings:
        console.print(f"  {seconds:8.3f} s  {name}")
    for w in warnings:
        console.print(f"[yellow]warning:[/] {w}")
    if result.graph.meta.get("source_format") == "torch":
        console.print(f"lowered with torch.{result.graph.meta.get('frontend')}")
    console.print(f"kept {after['nonzero_params']:,} of {after['params']:,} prunable weights "
                  f"({100 * after['density']:.2f}%) -> wrote {out}")


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):  # macs_by_kind
        return ", ".join(f"{k} {fmt(v)}" for k, v in value.items())
    return str(value)


def render_compact_written(console: Any, doc: dict[str, Any], out: str, *, layers: bool = True) -> None:
    """The compaction summary, or with ``--align auto`` the choice's line (only that when the masked model stayed)."""
    choice = doc.get("align_choice")
    if choice is None or choice["chosen"] != "masked":
        render_compact(console, doc, out, layers=layers)
    if choice is not None:
        from pai_compiler.align_choice import choice_line

        console.print(choice_line(choice), soft_wrap=True)
