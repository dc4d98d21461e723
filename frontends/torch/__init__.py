"""PyTorch frontends: torch.fx (``fx``) and torch.export (``export``) lower an nn.Module to the IR;
``ops`` maps aten/torch calls to IR nodes; ``spec`` loads ``file.py:attr`` specs. Importing this
package does not import torch.
"""
from __future__ import annotations
