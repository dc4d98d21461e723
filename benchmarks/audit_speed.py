"""Speed and memory of ``paic audit`` on ResNet-50 and ViT-B/16 against onnx-tool, as whole processes.

Targets (issue #19 item 1), judged in one run with the same thread count:

* ``paic audit --no-paths``: whole-process time ≤ ½ of onnx-tool's ``model_profile``, also a
  whole process (Python start, imports, load, profile), judged on CPU time (= quiet wall time at
  one thread; wall times are printed too, their ratio is the same on a quiet machine);
* the full audit (exact paths, effective weights/nodes/kernels, both log-path conventions):
  CPU time ≤ 3 s on ResNet-50 and ≤ 6 s on ViT-B/16;
* peak RSS ≤ 2.5 × the model's weight bytes, in both modes.

Every process runs ``--repeat`` times, paic and onnx-tool alternating (so load drifts hit both);
best wall, lowest CPU (user + sys) and highest peak RSS come from ``os.wait4`` (the child's own
rusage). CPU time equals quiet wall time for one thread and is robust to a busy machine. A
second child times the phases in one process (imports / load / audit). ``--baseline DIR`` runs
the same commands from another checkout (its root first on ``PYTHONPATH``), alternating too, for
a before → after table. onnx-tool runs with only ``--onnx-tool-path`` on its ``PYTHONPATH`` (a
``pip --target`` folder carrying its own numpy/onnx); paic's processes never see that folder.

    python benchmarks/audit_speed.py [--workdir DIR] [--repeat 3] [--threads 1] [--models resnet50 vit_b16]
        [--onnx-tool-path DIR] [--baseline DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules

from bench_setup import export_zoo_model, run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("resnet50", "vit_b16")
TARGET_FULL_CPU_S = {"resnet50": 3.0, "vit_b16": 6.0}
TARGET_SPEEDUP = 2.0  # --no-paths vs onnx-tool, whole processes
TARGET_RSS_X = 2.5  # peak RSS / weight bytes
PHASES = """
import json, sys, time
t0 = time.perf_counter()
from pai_compiler.audit import audit_graph
from pai_compiler.api import load_model
t1 = time.perf_counter()
graph = load_model(sys.argv[1], static_dims=1)  # as `paic audit` without --bind
t2 = time.perf_counter()
doc = audit_graph(graph, paths=sys.argv[2] == "full")
t3 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "load": t2 - t1, "audit": t3 - t2, "torch": "torch" in sys.modules, "onnx": "onnx" in sys.modules}))
"""
ONNX_TOOL = """
import contextlib, io, sys, time
import numpy as np
t0 = time.perf_counter()
import onnx_tool
t1 = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    onnx_tool.model_profile(sys.argv[1], dynamic_shapes={"input": np.zeros((1, 3, 224, 224), np.float32)})
print(t1 - t0, time.perf_counter() - t1)
"""


@dataclass
class Runs:
    """Best wall, lowest CPU, highest peak RSS over the repeats of one command."""

    wall: float = float("inf")
    cpu: float = float("inf")
    rss_mb: float = 0.0
    stdout: str = ""

    def add(self, run: dict[str, Any]) -> None:
        self.wall, self.cpu = min(self.wall, run["wall"]), min(self.cpu, run["cpu"])
        self.rss_mb = max(self.rss_mb, run["rss_mb"])
        self.stdout = self.stdout or run["stdout"]


def weight_bytes(path: Path) -> int:
    """Bytes of the model's initializers (what the RSS target is relative to)."""
    from pai_compiler.frontends.onnx.proto_view import read_model

    _, arrays = read_model(path)
    return sum(int(a.nbytes) for a in arrays.values())


def env_with_path(threads: int, path: str | None) -> dict[str, str]:
    """The child environment: ``threads`` for every BLAS/OpenMP pool, ``path`` alone on PYTHONPATH
    (children run in a scratch folder: ``python -m``/``-c`` put the working folder first on sys.path)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), COLUMNS="200")
    env.pop("PYTHONPATH", None)
    if path:
        env["PYTHONPATH"] = path
    return env


def run_child(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Wall, CPU and peak RSS of one child process; its stdout is returned."""
    run = run_measured(cmd, env)
    if run.code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({run.code}): {run.stderr.strip()[-500:]}")
    return {"wall": run.wall, "cpu": run.cpu, "rss_mb": run.rss_mb, "stdout": run.stdout}


def measure(path: Path, trees: dict[str, str], tool_env: dict[str, str] | None, threads: int, repeat: int) -> dict[str, Runs]:
    """Every command of one model, ``repeat`` rounds, alternating inside each round."""
    commands: dict[str, tuple[list[str], dict[str, str]]] = {}
    for label, tree in trees.items():
        env = env_with_path(threads, tree)
        for mode, flags in (("--no-paths", ["--no-paths"]), ("full", [])):
            commands[f"{label} {mode}"] = ([sys.executable, "-m", "pai_compiler.cli", "audit", str(path), "--json", *flags], env)
    if tool_env is not None:
        commands["onnx-tool"] = ([sys.executable, "-c", ONNX_TOOL, str(path)], tool_env)
    runs = {key: Runs() for key in commands}
    for _ in range(repeat):
        for key, (cmd, env) in commands.items():
            runs[key].add(run_child(cmd, env))
    return runs


def phases(path: Path, tree: str, threads: int, mode: str) -> str:
    got = json.loads(run_child([sys.executable, "-c", PHASES, str(path), mode], env_with_path(threads, tree))["stdout"])
    imported = "+".join(m for m in ("torch", "onnx") if got[m]) or "-"
    return f"{got['imports']:.2f}/{got['load']:.2f}/{got['audit']:.2f} ({imported})"


def model_rows(name: str, path: Path, runs: dict[str, Runs], trees: dict[str, str], threads: int) -> tuple[list[list[str]], list[str]]:
    """Table rows and missed targets of one model."""
    limit_mb = TARGET_RSS_X * weight_bytes(path) / 2**20
    tool = runs.get("onnx-tool")
    rows, missed = [], []
    for label, tree in trees.items():
        for mode in ("--no-paths", "full"):
            r = runs[f"{label} {mode}"]
            checks = [("RSS", r.rss_mb <= limit_mb, f"RSS ≤ {limit_mb:.0f} MB")]
            if mode == "full":
                target = TARGET_FULL_CPU_S[name]
                checks.append(("CPU", r.cpu <= target, f"CPU ≤ {target:.0f} s"))
            elif tool is not None:
                checks.append(("speed", TARGET_SPEEDUP * r.cpu <= tool.cpu, f"CPU ≤ {tool.cpu / TARGET_SPEEDUP:.2f} s (½ onnx-tool)"))
            verdict = "ok" if all(ok for _, ok, _ in checks) else "MISSED " + ",".join(what for what, ok, _ in checks if not ok)
            if label == "paic" and not verdict.startswith("ok"):
                missed.append(f"{name} {mode} ({verdict[7:]})")
            speed = f"{tool.cpu / r.cpu:.2f}x / {tool.wall / r.wall:.2f}x" if tool is not None else "-"
            rows.append([name, f"{label} {mode}", f"{r.wall:.2f}", f"{r.cpu:.2f}", f"{r.rss_mb:.0f}", speed,
                         phases(path, tree, threads, "full" if mode == "full" else "fast"), "; ".join(t for _, _, t in checks), verdict])
    if tool is not None:
        load, profile = (float(x) for x in tool.stdout.split())
        rows.append([name, "onnx-tool", f"{tool.wall:.2f}", f"{tool.cpu:.2f}", f"{tool.rss_mb:.0f}", "1.00x / 1.00x", f"{load:.2f}/-/{profile:.2f} (import/-/profile)", "", ""])
    return rows, missed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "paic-audit-bench")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--onnx-tool-path", default=None, help="folder holding onnx_tool and its own numpy/onnx (a pip --target)")
    parser.add_argument("--baseline", default=None, help="another paic checkout to time alongside (before -> after)")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    trees = {**({"baseline": str(Path(args.baseline).resolve())} if args.baseline else {}), "paic": str(ROOT)}
    tool_env = env_with_path(args.threads, args.onnx_tool_path) if args.onnx_tool_path else None
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {args.threads} thread(s); best of {args.repeat}, alternating")
    header = ["model", "run", "wall s", "CPU s", "peak RSS MB", "onnx-tool/this CPU / wall", "imports/load/audit s (in-process)", "targets", "verdict"]
    rows: list[list[str]] = []
    missed: list[str] = []
    for name in args.models:
        path = export_zoo_model(name, args.workdir)
        print(f"{name}: {weight_bytes(path) / 1e6:.1f} MB of weights", flush=True)
        got, lost = model_rows(name, path, measure(path, trees, tool_env, args.threads, args.repeat), trees, args.threads)
        rows += got
        missed += lost
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)))
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    if tool_env is None:
        print("onnx-tool not timed (--onnx-tool-path): the --no-paths speed target is not judged")
    print("missed: " + ", ".join(missed) if missed else "all targets met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
