"""Count paic's internal imports by floor: cycles, upward imports, private cross-package imports.

Floors (DESIGN.md), lowest first: ir (1); infra (2: pass_infra, pipeline, registry, interp,
interp_rules, interp_index_rules, interp_path_rules, interp_resize, interp_tables, io, errors, progress, memory, onnx_wire, ort, _version); passes (3); frontends and backends
(4, never each other); faces (5: api, cli, prune, audit, bench) and the lab (5: zoo, data,
training, autosparse label collection). Every ``import`` statement of every module counts,
module-level and function-local. Run ``python scripts/import_graph.py`` for the summary;
``tests/test_floors.py`` asserts the counts are zero.
"""
from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Import", "module_files", "imports_of", "floor_of", "violations", "cycles", "main"]

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"pai_compiler": ROOT / "pai_compiler", "pai_compiler.passes": ROOT / "passes",
                "pai_compiler.frontends": ROOT / "frontends"}
FOUNDATION = {"errors", "_version"}  # floor 0: leaves every floor may import
INFRA = {"pass_infra", "pipeline", "registry", "interp", "interp_rules", "interp_index_rules", "interp_path_rules", "interp_resize", "interp_tables", "io", "progress", "memory", "onnx_wire", "ort",
         "__init__"}
FACES = {"api", "cli", "cli_output", "prune", "audit", "bench"}


@dataclass(frozen=True)
class Import:
    """One internal import: who imports what, at which line, and whether inside a function."""

    source: str
    target: str
    line: int
    local: bool
    private_name: str = ""


def module_files() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    found: dict[str, Path] = {}
    for prefix, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            if prefix == "pai_compiler" and parts[:1] in (["passes"], ["frontends"]):
                continue
            found[name] = path
    return found


def _resolve(source: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = source.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> Iterator[Import]:
    """Internal imports of one module (targets resolved to the longest known module name)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    local_lines = {n.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        targets: list[tuple[str, str]] = []
        if isinstance(node, ast.Import):
            targets = [(a.name, "") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(name, is_package, node)
            targets = [(f"{module}.{a.name}", "") if f"{module}.{a.name}" in modules
                       else (module, a.name if a.name.startswith("_") and a.name != "__version__" else "")
                       for a in node.names]
        for target, private_name in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("pai_compiler") and target != name:
                yield Import(name, target, node.lineno, node.lineno in local_lines, private_name)


def floor_of(module: str) -> tuple[int, str]:
    """(floor number, area) of a module; area separates frontends from backends and faces from the lab."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top in FOUNDATION:
        return 0, "foundation"
    if top == "ir":
        return 1, "ir"
    if top == "passes":
        return 3, "passes"
    if top == "frontends":
        return 4, "frontends"
    if top == "backends":
        return 4, "backends"
    if top == "lab":
        return 5, "lab"
    if top in FACES:
        return 5, "faces"
    if top in INFRA:
        return 2, "infra"
    return 5, "faces"


def _is_private(module: str) -> bool:
    return any(p.startswith("_") and p != "__init__" for p in module.split(".")[1:])


def violations(edges: list[Import]) -> list[str]:
    """Upward imports, frontend<->backend imports, imports of the lab from below, private imports."""
    found: list[str] = []
    for edge in edges:
        (src_floor, src_area), (dst_floor, dst_area) = floor_of(edge.source), floor_of(edge.target)
        where = f"{edge.source}:{edge.line} -> {edge.target}"
        if edge.source == "pai_compiler" and dst_area != "lab":
            continue  # the package's lazy re-exports name the faces on purpose
        if dst_area == "lab" and src_area != "lab" and src_area != "faces":
            found.append(f"imports the lab from below: {where}")
        elif dst_floor > src_floor and not (src_area == "lab"):
            found.append(f"upward import: {where}")
        elif {src_area, dst_area} == {"frontends", "backends"}:
            found.append(f"frontend/backend import: {where}")
        if dst_area not in (src_area, "foundation") and _is_private(edge.target) and not _shares_package(
                edge.source, edge.target):
            found.append(f"private module of another package: {where}")
        if edge.private_name and not _shares_package(edge.source, edge.target):
            found.append(f"private name {edge.private_name!r} of another package: {where}")
    return found


def _shares_package(source: str, target: str) -> bool:
    """True when the private target lives in the importer's own package (or a subpackage of it)."""
    package = source.rpartition(".")[0]
    return target.startswith(package + ".")


def cycles(edges: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.source != "pai_compiler" and not e.source.endswith("__init__"):
            graph.setdefault(e.source, set()).add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return result


def all_imports() -> tuple[dict[str, Path], list[Import]]:
    modules = module_files()
    edges = [e for name, path in modules.items() for e in imports_of(name, path, modules)]
    return modules, edges


def main() -> int:
    modules, edges = all_imports()
    found = violations(edges)
    loops = cycles(edges)
    local = sum(e.local for e in edges)
    print(f"modules {len(modules)}, internal imports {len(edges)} ({local} function-local), "
          f"cycles {len(loops)}, floor violations {len(found)}")
    for loop in loops:
        print("  cycle:", " <-> ".join(loop))
    for line in found:
        print("  " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
