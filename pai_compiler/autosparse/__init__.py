"""AutoSparse: learn a pruning-at-initialization score from iterative rewind pruning (Liu et al. 2024).

``collect`` (iterative rewind pruning -> per-weight labels: rounds survived), ``predictor``
(the per-weight MLP: features, training, save/load) and the ``autosparse`` criterion pass
(``passes/criteria/autosparse.py``). ``default_predictor.npz`` is the predictor shipped as
package data (see ``scripts/make_autosparse_predictor.sh``). Importing this package does not
import torch.
"""
from __future__ import annotations
