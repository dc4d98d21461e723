"""ONNX frontend: ``reader`` lowers an ONNX model to the IR (``load_onnx_model``); ``ops`` maps ONNX ops
to IR nodes, ``static`` evaluates shape arithmetic at compile time; ``passes/transform/patterns`` (shared with the
torch frontend) fuses exporter idioms (GELU, LayerNorm, …) into single nodes.
"""
from __future__ import annotations

from pai_compiler.frontends.onnx.reader import *  # noqa: F403
from pai_compiler.frontends.onnx.reader import __all__  # noqa: F401
