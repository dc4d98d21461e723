"""Speed and memory of SynFlow (100 rounds) on big models: seconds per round and per 100 rounds, peak RSS, bytes per weight.

Each (model, checkout, precision) runs in its own process with ``OMP_NUM_THREADS`` threads; the
SynflowPass runs with its real 100-round schedule, and a recorder in place of its progress bar
stamps the end of every round's scoring, in CPU seconds (user + sys: a single thread's quiet wall
time, robust to a busy machine; the times reported) and wall seconds. Unless the model is in ``--full``, the child stops after
``--rounds`` rounds and the 100-round time is **extrapolated**: (setup + round 0) + 99 × the mean
later round (a round = the previous round's top-k + this round's forward/backward), without
the final mask assignment; a ``--full`` run reports the measured total as well. Peak RSS comes
from ``os.wait4``; "B/weight" is (peak RSS - RSS after loading the model) / prunable weights.
``--baseline DIR`` times another checkout (e.g. ``git archive <commit> | tar -x -C DIR``)
the same way, alternating with this one per model, so before/after share run conditions; with
``--alternate N`` one more process per model loads the baseline's ``synflow.py`` beside this
checkout's and times both N times in turn (same process, same loaded graph): the speed-up column.

    python benchmarks/synflow_speed.py [--models resnet20 alexnet ...] [--rounds 3] [--threads 1]
        [--baseline DIR [--alternate 2]] [--precisions float64 float32] [--full resnet20 alexnet] [--workdir DIR]
        [--agreement resnet20 vgg_small tiny_vit]   # float32's 100-round masks against float64's
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules

from bench_setup import export_zoo_model, onnx_light_model, run_measured  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LIGHT = {"alexnet": "light_bvlc_alexnet", "vgg19": "light_vgg19", "zfnet512": "light_zfnet512", "resnet50_light": "light_resnet50"}
ZOO = ("resnet50", "vit_b16")
MODELS = ("resnet20", *LIGHT, *ZOO)
EXAMPLES = ("resnet20", "vgg_small", "tiny_vit")
TARGET_S = 60.0
CHILD = r"""
import contextlib, json, os, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[6]))
from pai_compiler.api import load_model
from pai_compiler.pass_infra import AnalysisManager, RunContext
from pai_compiler.passes.criteria import synflow
path, iterations, timed, precision, sparsity = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
load_start = time.perf_counter()
graph = load_model(path)
load_s = time.perf_counter() - load_start
loaded_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
stamps = []

class Stop(Exception):
    pass

@contextlib.contextmanager
def recorder(enabled, label, total, unit="steps", console=None):
    def update(done, metrics):
        stamps.append((time.perf_counter(), time.process_time()))
        if timed <= done < total:
            raise Stop
    yield update

synflow.metric_bar = recorder  # the pass's per-round hook, in every version of it
load_before = os.getloadavg()[0]
start, start_cpu = time.perf_counter(), time.process_time()
try:
    synflow.SynflowPass(sparsity=sparsity, iterations=iterations, precision=precision).run(graph, AnalysisManager(graph, RunContext(progress=True)))
    total = [time.perf_counter() - start, time.process_time() - start_cpu]
except Stop:
    total = None
numel = sum(p.numel for p in graph.prunable_params())
print(json.dumps({"numel": numel, "load_s": load_s, "loaded_kb": loaded_kb, "first_s": [stamps[0][0] - start, stamps[0][1] - start_cpu],
                  "rounds": [[b[0] - a[0], b[1] - a[1]] for a, b in zip(stamps, stamps[1:])], "total_s": total,
                  "loadavg": [load_before, os.getloadavg()[0]]}))
"""
ALTERNATE = r"""
import contextlib, importlib.util, json, sys, time
import torch
torch.set_num_threads(int(sys.argv[5]))
from pai_compiler.api import load_model
from pai_compiler.pass_infra import AnalysisManager, RunContext
from pai_compiler.passes.criteria import synflow as after
path, baseline_file, timed, precision, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[6])
spec = importlib.util.spec_from_file_location("synflow_before", baseline_file)
before = sys.modules["synflow_before"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(before)
graph = load_model(path)

class Stop(Exception):
    pass

def seconds_per_round(module):
    stamps = []
    @contextlib.contextmanager
    def recorder(enabled, label, total, unit="steps", console=None):
        def update(done, metrics):
            stamps.append(time.process_time())  # CPU seconds: one thread's quiet wall time, robust to a busy machine
            if done >= timed:
                raise Stop
        yield update
    module.metric_bar = recorder
    g = graph.clone()
    try:
        module.SynflowPass(sparsity=0.9, iterations=100, precision=precision).run(g, AnalysisManager(g, RunContext(progress=True)))
    except Stop:
        pass
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return sum(gaps) / len(gaps)

out = {"before": [], "after": []}
for _ in range(repeats):
    for label, module in (("before", before), ("after", after)):
        out[label].append(seconds_per_round(module))
print(json.dumps(out))
"""

AGREEMENT = r"""
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
from pai_compiler.api import load_model
from pai_compiler.pass_infra import PassManager
from pai_compiler.passes.criteria.synflow import SynflowPass
masks = {}
for precision in ("float64", "float32"):
    graph = load_model(sys.argv[1])
    PassManager([SynflowPass(sparsity=float(sys.argv[2]), precision=precision)]).run(graph)
    masks[precision] = np.concatenate([p.mask.reshape(-1) for p in graph.prunable_params()])
exact, approx = masks["float64"], masks["float32"]
print(json.dumps({"kept": int(exact.sum()), "both": int((exact & approx).sum()), "same": float(np.mean(exact == approx))}))
"""


@dataclass(frozen=True)
class Run:
    """One child's measurement: CPU seconds (a single thread's quiet wall time), wall seconds beside them."""

    numel: int
    first_s: float
    round_s: float
    round_wall_s: float
    total_s: float | None
    peak_mb: float
    loaded_mb: float
    loadavg: tuple[float, float]

    @property
    def extrapolated_s(self) -> float:
        return self.first_s + 99 * self.round_s

    @property
    def bytes_per_weight(self) -> float:
        return (self.peak_mb - self.loaded_mb) * 2**20 / self.numel


def model_path(name: str, workdir: Path) -> Path:
    if name in EXAMPLES:
        return REPO / "examples" / "models" / f"{name}.onnx"
    if name in LIGHT:
        return onnx_light_model(LIGHT[name])
    return export_zoo_model(name, workdir)


def run_child(path: Path, code_root: Path, precision: str, rounds: int, threads: int, sparsity: float) -> Run | str:
    """One child's measurement, or its error's last line (e.g. R overflowing float32)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(code_root), os.environ.get("PYTHONPATH", "")])))
    cmd = [sys.executable, "-c", CHILD, str(path), "100", str(rounds), precision, str(sparsity), str(threads)]
    child = run_measured(cmd, env)
    if child.code != 0:
        return f"failed: {(child.stderr.strip().splitlines() or ['no output'])[-1][-160:]}"
    doc: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    later = doc["rounds"][1:] or doc["rounds"]  # round 1 may still pay first-touch costs
    total = doc["total_s"][1] if doc["total_s"] else None
    return Run(doc["numel"], doc["first_s"][1], sum(r[1] for r in later) / len(later), sum(r[0] for r in later) / len(later), total,
               child.rss_mb, doc["loaded_kb"] / 1024, tuple(doc["loadavg"]))  # type: ignore[arg-type]


def alternate(path: Path, baseline: Path, precision: str, rounds: int, threads: int, repeats: int) -> list[str]:
    """Before and after in one process, alternating (before, after) ``repeats`` times: a row of s/round and the ratio."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))
    baseline_file = baseline / "passes" / "criteria" / "synflow.py"
    load = os.getloadavg()[0]
    cmd = [sys.executable, "-c", ALTERNATE, str(path), str(baseline_file), str(rounds), precision, str(threads), str(repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), check=False)
    if done.returncode != 0:
        return [path.stem, precision, f"failed: {(done.stderr.strip().splitlines() or ['no output'])[-1][-160:]}", "", "", ""]
    times = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = statistics.median(b / a for b, a in zip(times["before"], times["after"]))
    return [path.stem, precision, " / ".join(f"{t:.3f}" for t in times["before"]), " / ".join(f"{t:.3f}" for t in times["after"]),
            f"{ratio:.2f}×", f"{load:.1f}/{os.getloadavg()[0]:.1f}"]


def agreement(path: Path, sparsity: float) -> str:
    """How much of float64's 100-round mask ``synflow{precision=float32}`` reproduces."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))
    done = subprocess.run([sys.executable, "-c", AGREEMENT, str(path), str(sparsity)], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir(), check=False)
    if done.returncode != 0:
        return f"| {path.stem} | failed: {(done.stderr.strip().splitlines() or ['no output'])[-1][-160:]} | | |"
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    return f"| {path.stem} | {doc['kept']:,} | {doc['both'] / max(doc['kept'], 1):.1%} | {doc['same']:.1%} |"


def row(name: str, label: str, run: Run, reference: Run | None) -> list[str]:
    per_100 = f"{run.total_s:.1f} (measured)" if run.total_s is not None else f"{run.extrapolated_s:.1f} (extrap.)"
    ratio = f"{run.round_s / reference.round_s:,.0f}×" if reference is not None else "n/a"
    verdict = "ok" if (run.total_s or run.extrapolated_s) < TARGET_S else "over"
    return [name, label, f"{run.numel:,}", f"{run.round_s:.3f}", f"{run.round_wall_s:.3f}", per_100, ratio, f"{run.peak_mb:,.0f}", f"{run.bytes_per_weight:.1f}",
            f"{run.loadavg[0]:.1f}/{run.loadavg[1]:.1f}", verdict]


def print_table(rows: list[list[str]]) -> None:
    header = ["model", "code / precision", "weights", "CPU s/round", "wall s/round", "CPU s/100 rounds", "round vs ResNet-20", "peak RSS MB", "B/weight",
              "load avg", f"< {TARGET_S:.0f} s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=sorted({*MODELS, *EXAMPLES}))
    parser.add_argument("--rounds", type=int, default=3, help="rounds timed before a child stops (>= 2)")
    parser.add_argument("--full", nargs="*", default=[], choices=MODELS, help="models run for all 100 rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--precisions", nargs="+", default=["float64"], choices=["float64", "float32"])
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to time the same way (before)")
    parser.add_argument("--alternate", type=int, default=0, metavar="N",
                        help="with --baseline: also time before and after in one process, alternating N times (ratio table)")
    parser.add_argument("--agreement", nargs="*", default=[], choices=sorted({*MODELS, *EXAMPLES}),
                        help="models whose float32 and float64 masks (100 rounds) are compared")
    parser.add_argument("--no-separate", action="store_true", help="skip the one-process-per-run table (with --alternate)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "paic-synflow-bench")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (a round's time is the gap between two rounds)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    versions = [("before", args.baseline)] if args.baseline else []
    versions.append(("after", REPO))
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}: load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
          f"{args.threads} thread(s); sparsity {args.sparsity}; {args.rounds} rounds timed unless --full", flush=True)
    references: dict[tuple[str, str], Run] = {}
    rows = []
    for name in [] if args.no_separate else ["resnet20", *[m for m in args.models if m != "resnet20"]]:
        path = model_path(name, args.workdir)
        for precision in args.precisions:
            for label, root in versions:
                rounds = 100 if name in args.full else args.rounds
                run = run_child(path, root, precision, rounds, args.threads, args.sparsity)
                if isinstance(run, str):
                    rows.append([name, f"{label} / {precision}", run, *[""] * 8])
                    print(" ".join(rows[-1]), flush=True)
                    continue
                if name == "resnet20":
                    references[(label, precision)] = run
                rows.append(row(name, f"{label} / {precision}", run, references.get((label, precision))))
                print(" ".join(rows[-1]), flush=True)
    if rows:
        print()
        print_table(rows)
    if args.baseline and args.alternate:
        print(f"\nsame process, alternating before/after {args.alternate}×, {args.rounds} rounds each (CPU s/round):\n")
        print("| model | precision | before CPU s/round | after CPU s/round | speed-up (median) | load avg |\n|---|---|---|---|---|---|")
        for name in args.models:
            for precision in args.precisions:
                cells = alternate(model_path(name, args.workdir), args.baseline, precision, args.rounds, args.threads, args.alternate)
                print("| " + " | ".join([name, *cells[1:]]) + " |", flush=True)
    if args.agreement:
        print(f"\nsynflow{{precision=float32}} against the float64 default, 100 rounds, sparsity {args.sparsity}:\n")
        print("| model | float64 keeps | of which float32 keeps | whole-mask agreement |\n|---|---|---|---|")
        for name in args.agreement:
            print(agreement(model_path(name, args.workdir), args.sparsity), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
