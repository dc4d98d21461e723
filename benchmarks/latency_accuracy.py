"""Test accuracy against measured latency of the CIFAR-10 ResNet-20 accuracy runs, each at its fastest form.

speed-up = t(dense ResNet-20 in onnxruntime) / t(fastest form of the run's mask), the two timed
alternating in one process. For every run file of ``benchmarks/accuracy.py`` the mask is rebuilt
from its seed and checked against the code of the run's own commit (``run_masks.py``); a run whose
mask is not reproduced is left out of the plot and listed. Each reproduced mask (one per
(method, sparsity, seed): CPU and GPU runs share it where the check says they trained the same
mask) becomes four forms (``fast_forms.py``): the masked ONNX model (weights zeroed), the compact
ONNX model (``dead-node-elim``) and the same kept at widths multiples of 4 (``--align 4``) in
onnxruntime, and the sparse-execution torch module
(per layer dense or sparse kernel, whichever was faster at the batch); each is timed against
dense ORT at every ``--batches`` size with ``--threads`` threads (ORT intra-op, torch).

Resumable: ``docs/results/latency_accuracy.json`` keeps the digests rebuilt at each run's commit
and the timings by mask digest; a rerun rebuilds the masks with the current code (their
digests decide what is reproduced) and measures only digests without timings.
``latency_accuracy_report.py`` renders ``latency_accuracy.md`` and ``.png`` from that file.

    python benchmarks/latency_accuracy.py                      # check, measure what is missing, render
    python benchmarks/latency_accuracy.py --methods magnitude --seeds 0 --runs 5
    python benchmarks/latency_accuracy.py --render-only
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pai_compiler.api import load_model
from pai_compiler.audit import masks_from_zeros
from pai_compiler.backends.torch_onnx import export_onnx
from pai_compiler.io import atomic_write
from pai_compiler.lab import zoo
from pai_compiler.lab.training import default_data_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules, also when imported by path

import fast_forms  # noqa: E402
from bench_setup import machine  # noqa: E402
import latency_accuracy_report  # noqa: E402
import run_masks  # noqa: E402

__all__ = ["main", "measure", "export_forms", "load_store"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
#: the aligned compact form keeps layer widths multiples of this (docs/compact_speed.md: odd widths slow ORT down)
ALIGN = 4


def load_store(path: Path) -> dict[str, Any]:
    """The resumable results file: at_commit (commit -> case key -> digest), masks (case key -> summary), timings (digest -> batch -> row)."""
    if path.exists():
        store = json.loads(path.read_text())
    else:
        store = {}
    for key in ("at_commit", "masks", "timings"):
        store.setdefault(key, {})
    return store


def save_store(path: Path, store: dict[str, Any]) -> None:
    with atomic_write(path) as out:
        out.write_text(json.dumps(store, indent=1, sort_keys=True) + "\n")


def verify_at_commits(runs: Sequence[run_masks.RunRecord], store: dict[str, Any], path: Path, data_dir: Path,
                      mask_device: str) -> None:
    """Rebuild, at each run's commit, the masks not yet in the store (one subprocess per commit)."""
    wanted: dict[str, set[run_masks.MaskCase]] = defaultdict(set)
    for run in runs:
        case = run.case(mask_device)
        if run.rebuildable(mask_device) and run.commit and case.key not in store["at_commit"].get(run.commit, {}):
            wanted[run.commit].add(case)
    for commit, cases in sorted(wanted.items()):
        print(f"rebuilding {len(cases)} mask(s) with the code of {commit[:8]}", flush=True)
        try:
            found = run_masks.digests_at_commit(commit, sorted(cases, key=lambda c: c.key), data_dir)
        except (RuntimeError, OSError) as exc:
            print(f"  {exc}", flush=True)  # those runs stay unverified
            continue
        store["at_commit"].setdefault(commit, {}).update(found)
        save_store(path, store)


def export_forms(rebuilt: run_masks.RebuiltMask, folder: Path, batches: Sequence[int], threads: int = 1
                 ) -> tuple[Path, fast_forms.CompactForms]:
    """Write the masked ONNX model of ``rebuilt`` (zoo weights times the mask) and its compact and sparse forms."""
    case = rebuilt.case
    torch.manual_seed(case.seed)
    model = zoo.build(case.model, num_classes=10)
    weights = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in rebuilt.masks.items():
            weights[name].mul_(torch.from_numpy(mask).to(weights[name].dtype))
    stem = folder / case.key
    masked = Path(f"{stem}_masked.onnx")
    export_onnx(model, tuple(zoo.input_shape(case.model)), masked)
    graph = load_model(masked)
    masks_from_zeros(graph)
    kept = sum(int(np.count_nonzero(p.data)) for p in graph.prunable_params())
    expected = sum(int(m.sum()) for m in rebuilt.masks.values())
    if kept != expected:  # a weight the export changed or a zero the init drew: the forms would not be this mask
        raise SystemExit(f"{case.key}: the exported model keeps {kept} prunable weights, the mask {expected}")
    # the sparse module's kernels are chosen at the thread count they will be timed at
    return masked, fast_forms.write_compact_forms(graph, masked, stem, batches, pipeline=rebuilt.pipeline, aligns=(ALIGN,),
                                                  threads=threads)


def measure(rebuilt: run_masks.RebuiltMask, dense: Path, folder: Path, batches: Sequence[int], threads: int, runs: int,
            warmup: int, budget_s: float) -> dict[str, Any]:
    """batch -> timing row of the mask's four forms against dense ORT."""
    masked, written = export_forms(rebuilt, folder, batches, threads)
    rows = {}
    for batch in batches:
        forms = {"masked ORT": masked, "compact ORT": written.compact, f"compact ORT a{ALIGN}": written.aligned[ALIGN],
                 "sparse torch": written.sparse[batch]}
        times = fast_forms.time_forms(dense, forms, batch=batch, threads=threads, runs=runs, warmup=warmup, budget_s=budget_s)
        report = written.reports[batch]
        rows[str(batch)] = {"dense_ort_ms": times.dense_ms, "form_ms": times.form_ms, "fastest": times.fastest(),
                            "max_rel_vs_masked": times.max_rel_vs_first, "threads": threads, "runs": times.runs, "warmup": warmup,
                            "sparse_layers": report.sparse_layers, "layers": len(report.layers)}
        print(f"  b{batch}: dense {times.dense_ms:.2f} ms, " + ", ".join(
            f"{label} {times.speedup(label):.2f}x" for label in forms), flush=True)
    for path in [masked, written.compact, *written.aligned.values(), *written.sparse.values()]:
        path.unlink()
    return rows


def dense_model(folder: Path, model_name: str) -> Path:
    """The dense zoo model (seed 0) as ONNX: the reference every form is timed against."""
    torch.manual_seed(0)
    path = folder / f"{model_name}_dense.onnx"
    export_onnx(zoo.build(model_name, num_classes=10), tuple(zoo.input_shape(model_name)), path)
    return path


def rebuild_and_measure(runs: Sequence[run_masks.RunRecord], store: dict[str, Any], path: Path, args: argparse.Namespace) -> None:
    """Rebuild every run's mask with the current code; time the reproduced ones whose digest has no timing yet."""
    torch.set_num_threads(args.threads)
    cases = sorted({run.case(args.mask_device) for run in runs if run.rebuildable(args.mask_device)}, key=lambda c: c.key)
    with tempfile.TemporaryDirectory() as tmp:
        dense = dense_model(Path(tmp), runs[0].model)
        for case in cases:
            rebuilt = run_masks.rebuild(case, args.data_dir)
            store["masks"][case.key] = rebuilt.summary()
            save_store(path, store)
            mine = [run for run in runs if run.rebuildable(args.mask_device) and run.case(args.mask_device) == case]
            checks = [run_masks.check_run(run, rebuilt.summary(), store["at_commit"].get(run.commit, {}).get(case.key))
                      for run in mine]
            print(f"{case.key}: {rebuilt.digest}, " + ", ".join(f"{r.file}: {c.status}" for r, c in zip(mine, checks)), flush=True)
            have = store["timings"].get(rebuilt.digest, {})
            if not any(c.reproduced for c in checks) or (all(str(b) in have for b in args.batches) and not args.redo):
                continue
            store["timings"][rebuilt.digest] = {**have, **measure(rebuilt, dense, Path(tmp), args.batches, args.threads,
                                                                  args.runs, args.warmup, args.budget)}
            save_store(path, store)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", type=Path, default=RESULTS / "runs")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--methods", nargs="+", help="only these methods (default: every method with runs)")
    p.add_argument("--seeds", nargs="+", type=int, help="only these seeds")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=9, help="alternating timing rounds per batch, at least (median)")
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timing per mask and batch: more rounds (<= 200) for fast models")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mask-device", default="cpu", help="rebuild the masks of GPU runs on this device (cuda: on a GPU machine)")
    p.add_argument("--redo", action="store_true", help="time again masks that already have timings")
    p.add_argument("--render-only", action="store_true", help="only render the markdown and plot from the JSON")
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--json", type=Path, default=RESULTS / "latency_accuracy.json")
    p.add_argument("--out", type=Path, default=RESULTS / "latency_accuracy.md")
    p.add_argument("--plot", type=Path, default=RESULTS / "latency_accuracy.png")
    args = p.parse_args(argv)
    for flag, value in (("--threads", args.threads), ("--runs", args.runs), *(("--batches", b) for b in args.batches)):
        if value < 1:
            p.error(f"{flag} must be a positive integer, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    runs = [run for run in run_masks.load_runs(args.runs_dir, dataset=args.dataset, model=args.model)
            if (not args.methods or run.method in args.methods) and (args.seeds is None or run.seed in args.seeds)]
    if not runs:
        raise SystemExit(f"--runs-dir {args.runs_dir}: no {args.dataset} {args.model} runs (with --methods/--seeds as given)")
    store = load_store(args.json)
    if not args.render_only:
        verify_at_commits(runs, store, args.json, args.data_dir, args.mask_device)
        rebuild_and_measure(runs, store, args.json, args)
        store["machine"] = machine()
        command = " ".join(["python benchmarks/latency_accuracy.py", *(argv if argv is not None else sys.argv[1:])])
        store["commands"] = [*store.get("commands", []), command]
        save_store(args.json, store)
    all_runs = run_masks.load_runs(args.runs_dir, dataset=args.dataset, model=args.model)
    rows = latency_accuracy_report.run_rows(all_runs, store, args.mask_device)
    with atomic_write(args.out) as out:
        out.write_text(latency_accuracy_report.render_markdown(rows, store))
    latency_accuracy_report.plot(rows, store, args.plot)
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
