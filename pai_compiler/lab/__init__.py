"""The lab: example models (``zoo``), datasets (``data``), training (``training``) and AutoSparse
label collection (``autosparse_collect``). Faces and benchmarks use it; nothing below the faces
imports it.
"""
from __future__ import annotations
