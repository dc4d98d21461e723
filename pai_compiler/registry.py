"""Registry of passes: built-ins as lazy ``module:Class`` strings plus the ``paic.passes`` entry points.

Nothing is imported until a pass is asked for, so ``paic --help`` stays fast. A plugin whose
name clashes with a built-in or another plugin is an error naming both sources.
"""
from __future__ import annotations

import importlib
from functools import lru_cache

from pai_compiler.errors import PaicError, UsageError

__all__ = ["BUILTIN_PASSES", "ENTRY_POINT_GROUP", "get_pass_class", "available_passes"]

ENTRY_POINT_GROUP = "paic.passes"

BUILTIN_PASSES: dict[str, str] = {
    # allocation: per-layer keep counts
    "erk": "pai_compiler.passes.allocation.erk:ErkPass",
    "uniform": "pai_compiler.passes.allocation.uniform:UniformPass",
    # criteria: masks
    "random": "pai_compiler.passes.criteria.random:RandomPass",
    "magnitude": "pai_compiler.passes.criteria.magnitude:MagnitudePass",
    "dpai": "pai_compiler.passes.criteria.dpai.criterion:DpaiPass",
    "npb": "pai_compiler.passes.criteria.npb.criterion:NpbPass",
    "random-erk": "pai_compiler.passes.criteria.random_erk:RandomErkPass",
    "synflow": "pai_compiler.passes.criteria.synflow:SynflowPass",
    "snip": "pai_compiler.passes.criteria.snip:SnipPass",
    "grasp": "pai_compiler.passes.criteria.grasp:GraspPass",
    "autosparse": "pai_compiler.passes.criteria.autosparse.criterion:AutosparsePass",
    # analyses
    "sparsity": "pai_compiler.passes.analysis.sparsity:SparsityPass",
    "node-path": "pai_compiler.passes.analysis.node_path:NodePathPass",
    "flops": "pai_compiler.passes.analysis.flops:FlopsPass",
    # transforms
    "dead-node-elim": "pai_compiler.passes.transform.dead_node_elim:DeadNodeElimPass",
}


@lru_cache(maxsize=1)
def _sources() -> dict[str, str]:
    """name -> 'module:Class' for built-ins and installed plugins."""
    from importlib.metadata import entry_points  # ~20 ms (email, zipfile, csv): only once a pass is looked up

    sources = dict(BUILTIN_PASSES)
    origin = {name: "built-in" for name in sources}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep.dist, "name", "?") if ep.dist is not None else "?"
        if ep.name in sources:
            raise PaicError(
                f"pass name clash: {ep.name!r} is registered by {origin[ep.name]} ({sources[ep.name]}) "
                f"and by plugin {dist} ({ep.value})"
            )
        sources[ep.name] = ep.value
        origin[ep.name] = f"plugin {dist}"
    return sources


def available_passes() -> list[str]:
    return sorted(_sources())


def get_pass_class(name: str) -> type:
    sources = _sources()
    if name not in sources:
        raise UsageError(f"unknown pass {name!r} (available: {', '.join(sorted(sources))})")
    module_name, _, attr = sources[name].partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise PaicError(f"cannot load pass {name!r} from {sources[name]}: {exc}") from exc
    if getattr(cls, "name", None) != name:
        raise PaicError(f"pass class {sources[name]} declares name {getattr(cls, 'name', None)!r}, registered as {name!r}")
    return cls
