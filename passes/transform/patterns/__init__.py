"""Pattern fusions shared by the frontends: exporter idioms spelled out of primitives become the one
IR node they are, so path counts, coupling and FLOPs see an activation/norm, not a product.

Frontend-neutral (they read and rewrite the IR only): the ONNX reader runs ``fuse_patterns``
(activations, LayerNorm, channel shuffles); the torch frontend runs ``fuse_activations`` and
``fuse_layer_norms`` on what it lowered. Modules by role: ``activations`` (GELU, SiLU, Mish,
HardSwish; ``fuse_patterns``), ``layer_norm`` (LayerNorm), ``shuffle`` (channel permutations
-> one gather), ``match`` (the matchers they share; constants checked to their dtype's precision).
"""
from __future__ import annotations

from pai_compiler.passes.transform.patterns.activations import fuse_activations, fuse_patterns
from pai_compiler.passes.transform.patterns.layer_norm import fuse_layer_norms
from pai_compiler.passes.transform.patterns.shuffle import fuse_channel_permutations

__all__ = ["fuse_patterns", "fuse_activations", "fuse_layer_norms", "fuse_channel_permutations"]
