"""Behaviour digests: what ``paic optimize`` and ``paic audit --json`` write, reduced to hashes.

Each case runs the CLI in-process on a bundled example model with a fixed seed; a masked
model becomes the sha256 of its masks (``initializer != 0``, packed bits, by name) plus the
report's totals, an audit document its canonical JSON. ``tests/golden/behaviour.json`` holds
the digests recorded before a refactor; ``test_behaviour.py`` recomputes and compares them.
Record anew (only for a deliberate behaviour change, named in its commit) with
``python tests/behaviour.py --record``.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "models"
GOLDEN = Path(__file__).resolve().parent / "golden" / "behaviour.json"

#: case name -> (model, extra CLI flags); every optimize case also gets --seed 3.
OPTIMIZE_CASES: dict[str, tuple[str, list[str]]] = {
    "magnitude-resnet20": ("resnet20", ["-m", "magnitude", "-s", "0.9"]),
    "magnitude-tiny_vit": ("tiny_vit", ["-m", "magnitude", "-s", "0.8"]),
    "random-vgg_small": ("vgg_small", ["-m", "random", "-s", "0.9"]),
    "random-global-resnet20": ("resnet20", ["-m", "random", "-s", "0.95", "--allocation", "global"]),
    "synflow-global-vgg_small": ("vgg_small", ["-p", "synflow{sparsity=0.95,iterations=5}"]),
    "synflow-layer-resnet20": ("resnet20", ["-p", "erk{sparsity=0.95},synflow{scope=layer,iterations=5}"]),
    "synflow-tiny_vit": ("tiny_vit", ["-m", "synflow", "-s", "0.9"]),
    "snip-resnet20": ("resnet20", ["-m", "snip", "-s", "0.95", "--data", "{data}", "--samples", "3"]),
    "grasp-vgg_small": ("vgg_small", ["-m", "grasp", "-s", "0.9", "--data", "{data}", "--samples", "3"]),
    "npb-vgg_small": ("vgg_small", ["-m", "npb", "-s", "0.95"]),
    "dpai-channel-resnet20": ("resnet20", ["-m", "dpai", "-s", "0.99", "--steps", "20"]),
    "dpai-channel-tiny_vit": ("tiny_vit", ["-m", "dpai", "-s", "0.95", "--steps", "10"]),
    "dpai-ref-vgg_small": ("vgg_small", ["-p", "erk{sparsity=0.98},dpai{paths=ref,steps=8}"]),
    "autosparse-resnet20": ("resnet20", ["-m", "autosparse", "-s", "0.9", "--data", "random"]),
    "random-erk-compact-resnet20": ("resnet20", ["-m", "random-erk", "-s", "0.99", "--compact"]),
}
AUDIT_CASES: dict[str, tuple[str, list[str]]] = {
    "audit-resnet20": ("resnet20", []),
    "audit-tiny_vit": ("tiny_vit", []),
    "audit-vgg_small-bind": ("vgg_small", ["--bind", "N=4"]),
}
VOLATILE = {"paic_version", "seconds", "time", "timings", "wall_s", "version", "commit", "output", "model", "path", "report"}


def tiny_dataset(path: Path) -> Path:
    """A fixed 10-class CIFAR-shaped sample (3 per class) for the data-driven criteria."""
    rng = np.random.default_rng(0)
    x = rng.random((30, 32, 32, 3), dtype=np.float32)
    y = np.repeat(np.arange(10), 3).astype(np.int64)
    np.savez(path, x_train=(x * 255).astype(np.uint8), y_train=y)
    return path


def _strip(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: _strip(v) for k, v in sorted(doc.items()) if k not in VOLATILE}
    if isinstance(doc, list):
        return [_strip(v) for v in doc]
    if isinstance(doc, float):
        return round(doc, 6)
    return doc


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def mask_digest(onnx_path: Path) -> str:
    """sha256 over (name, shape, packed nonzero bits) of every float initializer."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    sha = hashlib.sha256()
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        array = numpy_helper.to_array(init)
        if array.dtype.kind != "f" or array.ndim < 2:
            continue
        sha.update(f"{init.name}{array.shape}".encode())
        sha.update(np.packbits(array != 0).tobytes())
    return sha.hexdigest()[:16]


def _invoke(args: list[str]) -> None:
    from typer.testing import CliRunner

    from pai_compiler.cli import app

    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        raise RuntimeError(f"paic {' '.join(args)} exited {result.exit_code}: {result.output[-2000:]}")


def run_case(name: str, workdir: Path) -> dict[str, str]:
    """Digests of one case: masks + report totals (optimize) or the document (audit)."""
    data = workdir / "tiny.npz"
    if not data.exists():
        tiny_dataset(data)
    if name in AUDIT_CASES:
        model, flags = AUDIT_CASES[name]
        from typer.testing import CliRunner

        from pai_compiler.cli import app

        result = CliRunner().invoke(app, ["audit", str(EXAMPLES / f"{model}.onnx"), "--json", *flags])
        if result.exit_code != 0:
            raise RuntimeError(f"paic audit {model} exited {result.exit_code}: {result.output[-2000:]}")
        return {"audit": _digest(_strip(json.loads(result.stdout)))}
    model, flags = OPTIMIZE_CASES[name]
    out, report = workdir / f"{name}.onnx", workdir / f"{name}.report.json"
    flags = [f.replace("{data}", str(data)) for f in flags]
    _invoke(["optimize", str(EXAMPLES / f"{model}.onnx"), "-o", str(out), "--report", str(report),
             "--seed", "3", "-q", *flags])
    doc = json.loads(report.read_text())
    return {"masks": mask_digest(out), "report": _digest(_strip(doc))}


def all_cases() -> list[str]:
    return [*OPTIMIZE_CASES, *AUDIT_CASES]


def record(workdir: Path) -> dict[str, dict[str, str]]:
    import torch

    torch.set_num_threads(1)
    return {name: run_case(name, workdir) for name in all_cases()}


if __name__ == "__main__":
    import tempfile

    if "--record" not in sys.argv:
        raise SystemExit("usage: python tests/behaviour.py --record")
    with tempfile.TemporaryDirectory() as tmp:
        digests = record(Path(tmp))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(digests)} cases in {GOLDEN}")
