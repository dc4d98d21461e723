"""PyTorch frontends: torch.fx (``fx``) and torch.export (``export``) lower an nn.Module to the IR;
``ops`` maps aten/torch calls to IR nodes through ``lowering`` (the shared IR builder) and
``operands`` (constants, the module handle, example inputs); ``aten`` holds export's ATen rules;
``spec`` loads ``file.py:attr`` specs and picks the frontend (``auto``: fx, then export). Importing this
package does not import torch.
"""
from __future__ import annotations
