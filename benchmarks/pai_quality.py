"""PaI quality table: per method and sparsity, pruning time and the topology the mask leaves.

For each model (CIFAR shapes) x sparsity x method: ``paic``'s own pipeline
``erk{sparsity=s},M`` (per-layer ERK budgets for every method; SNIP/GraSP/AutoSparse score
10 CIFAR-10 training images per class), then the audit: exact log paths (sum pooling), the
DPaI reference value, effective nodes (DPaI and NPB conventions), effective kernels,
effective params and effective MACs. Writes a markdown table with the command and machine.

    python benchmarks/pai_quality.py [--models resnet20,vgg19,resnet18] [--sparsities 0.9,0.95,0.98,0.99,0.9968]
                                     [--methods all] [--dpai-steps 3000] [--out docs/pai_quality.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PAIC_DATA_DIR", ROOT.parent / "shared" / "data")) / "cifar10.npz"
DATA_DRIVEN = {"snip", "grasp", "autosparse"}
COLUMNS = ("log_paths", "log_paths_dpai", "effective_nodes", "effective_nodes_npb", "effective_kernels", "effective_params", "macs_effective")


def main() -> None:
    import torch

    from pai_compiler.lab import zoo
    from pai_compiler.api import load_model, optimize
    from pai_compiler.audit import audit_graph, format_value
    from pai_compiler.lab.data import load_prune_batch
    from pai_compiler.registry import available_passes
    from pai_compiler.backends.torch_onnx import export_onnx

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20,vgg19,resnet18")
    ap.add_argument("--sparsities", default="0.9,0.95,0.98,0.99,0.9968")
    ap.add_argument("--methods", default="all")
    ap.add_argument("--dpai-steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "pai_quality.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    criteria = ["random-erk", "magnitude", "snip", "grasp", "synflow", "npb", "dpai", "autosparse"]
    methods = [m for m in criteria if m in available_passes()] if args.methods == "all" else args.methods.split(",")
    data = None
    rows: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="paic_quality_"))
    for name in args.models.split(","):
        torch.manual_seed(args.seed)
        path = work / f"{name}.onnx"
        export_onnx(zoo.build(name), zoo.input_shape(name), path)
        for sparsity in (float(s) for s in args.sparsities.split(",")):
            for method in methods:
                if method in DATA_DRIVEN and data is None:
                    data = load_prune_batch(DATA, samples_per_class=10, seed=args.seed, input_shape=zoo.input_shape(name))
                graph = load_model(path)
                criterion = f"dpai{{steps={args.dpai_steps}}}" if method == "dpai" else ("random-erk" if method == "random-erk" else f"{method}{{scope=layer}}")
                if method == "npb":
                    criterion = "npb"
                start = time.perf_counter()
                try:
                    optimize(graph, pipeline=f"erk{{sparsity={sparsity}}},{criterion}", seed=args.seed, data=data if method in DATA_DRIVEN else None)
                except Exception as exc:  # report the failure in the table, keep going
                    rows.append(f"| {name} | {sparsity:.2%} | {method} | failed: {' '.join(str(exc).split())[:80]} |" + " |" * len(COLUMNS))
                    continue
                seconds = time.perf_counter() - start
                totals = audit_graph(graph)["totals"]
                cells = [format_value(totals[c], digits=2) for c in COLUMNS]
                rows.append(f"| {name} | {sparsity:.2%} | {method} | {seconds:.1f} | " + " | ".join(cells) + " |")
                print(rows[-1], flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    header = ("| model | sparsity | method | prune s | " + " | ".join(COLUMNS) + " |\n|" + "---|" * (4 + len(COLUMNS)))
    text = (
        "# PaI quality: pruning time and surviving topology\n\n"
        f"Command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}` (commit {commit}); "
        f"machine: {cpu}, {os.cpu_count()} cores, torch threads 1; pipelines `erk{{sparsity=s}},M`, seed {args.seed}.\n"
        "log_paths: exact per-pixel log count with sum pooling; log_paths_dpai: the DPaI reference value; nodes: DPaI "
        "convention (and NPB convention); MACs at batch 1. Prune seconds are wall time on a shared machine.\n\n"
        + header + "\n" + "\n".join(rows) + "\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
