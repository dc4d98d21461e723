#!/usr/bin/env python3
"""Generate the example ONNX models shipped in ``examples/models``.

Builds ``resnet20``, ``vgg_small`` and ``tiny_vit`` from the in-repo zoo
(``pai_compiler.lab.zoo``) with ``torch.manual_seed(0)`` before each model and
exports them with the legacy TorchScript ONNX exporter (opset 18, dynamic batch
dimension ``batch``, initializer names equal to the ``state_dict`` names,
BatchNormalization nodes kept).  The output is byte-for-byte deterministic.

Usage::

    python examples/models/generate.py [--out-dir examples/models]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

import torch  # noqa: E402

from pai_compiler.lab import zoo  # noqa: E402
from pai_compiler.backends.torch_onnx import export_onnx  # noqa: E402

__all__ = ["EXAMPLE_MODELS", "generate", "main"]

#: Zoo models exported as examples (default factory arguments).
EXAMPLE_MODELS: tuple[str, ...] = ("resnet20", "vgg_small", "tiny_vit")

SEED: int = 0


def generate(out_dir: Path) -> list[Path]:
    """Export every model in :data:`EXAMPLE_MODELS` to ``out_dir/<name>.onnx``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in EXAMPLE_MODELS:
        torch.manual_seed(SEED)
        model = zoo.build(name).eval()
        path = out_dir / f"{name}.onnx"
        export_onnx(model, zoo.input_shape(name), path, dynamo=False)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="output directory (default: the directory of this script, examples/models)",
    )
    args = parser.parse_args(argv)
    for path in generate(args.out_dir):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"{path}  {path.stat().st_size:>9d} bytes  sha256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
