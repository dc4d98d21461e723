"""AutoSparse: a per-weight pruning score learned from iterative-rewind-pruning survivors.

``predictor`` (the per-weight MLP: features, training, save/load; ``default_predictor.npz`` is
the shipped one) and ``criterion`` (the ``autosparse`` pass). The label collection that trains a
predictor is lab work: ``pai_compiler.lab.autosparse_collect``. Importing this package does not
import torch.
"""
from __future__ import annotations

from pai_compiler.passes.criteria.autosparse.criterion import AutosparsePass

__all__ = ["AutosparsePass"]
