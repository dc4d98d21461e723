"""paic — the Pruning-at-Initialization Compiler.

Frontends lower a model (ONNX or PyTorch) to the IR in ``pai_compiler.ir``; passes analyse
and prune it; backends write masked models and reports. Heavy dependencies (torch,
onnxruntime) are imported lazily, so ``import pai_compiler`` stays light.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from pai_compiler._version import __version__


def _map_source_tree() -> None:
    """In a source checkout, expose ``<root>/passes`` and ``<root>/frontends`` as subpackages.

    The wheel installs them as ``pai_compiler/passes`` and ``pai_compiler/frontends``
    (setuptools package-dir); an editable install or a bare checkout has them beside us.
    """
    here = Path(__file__).resolve().parent
    for sub in ("passes", "frontends"):
        name = f"{__name__}.{sub}"
        src = here.parent / sub
        if name in sys.modules or (here / sub).is_dir() or not (src / "__init__.py").is_file():
            continue
        spec = importlib.util.spec_from_file_location(name, src / "__init__.py", submodule_search_locations=[str(src)])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


_map_source_tree()

_LAZY = {
    "Graph": "pai_compiler.ir",
    "Node": "pai_compiler.ir",
    "Value": "pai_compiler.ir",
    "Param": "pai_compiler.ir",
    "OpKind": "pai_compiler.ir",
    "to_text": "pai_compiler.ir",
    "PassManager": "pai_compiler.pass_infra",
    "AnalysisManager": "pai_compiler.pass_infra",
    "AnalysisPass": "pai_compiler.pass_infra",
    "TransformPass": "pai_compiler.pass_infra",
    "PassResult": "pai_compiler.pass_infra",
    "RunContext": "pai_compiler.pass_infra",
    "parse_pipeline": "pai_compiler.pipeline",
    "format_pipeline": "pai_compiler.pipeline",
    "load_model": "pai_compiler.api",
    "optimize": "pai_compiler.api",
    "save_model": "pai_compiler.api",
    "prune": "pai_compiler.prune",
    "PruneResult": "pai_compiler.prune",
    "PaicError": "pai_compiler.errors",
    "ModelError": "pai_compiler.errors",
    "UsageError": "pai_compiler.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pai_compiler' has no attribute {name!r}")
