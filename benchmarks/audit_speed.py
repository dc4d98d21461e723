"""Speed of ``paic audit`` on ResNet-50 and ViT-B/16: whole-process wall / CPU time and peak RSS.

Targets (issue [analysis]): ``paic audit --no-paths`` within 2× of onnx-tool's profiler, and the
full audit (exact paths, effective weights/nodes/kernels, DPaI log P̃) under 5 s on ResNet-50
and under 15 s on ViT-B/16. Each ``paic audit`` runs as its own process (``--repeat`` times,
best and median reported); wall time, CPU time (user + sys) and peak RSS come from
``os.wait4`` (the per-child form of ``resource.getrusage(RUSAGE_CHILDREN)``). CPU time equals
quiet wall time for a single thread and is robust to a busy machine. A second child times the
phases in one process (imports / load / audit), which is what a same-process onnx-tool call
compares with. onnx-tool is timed the same two ways when importable (``--onnx-tool-path`` adds
a folder to its ``sys.path``); otherwise the issue's anchors are printed (≈0.2 s / ≈0.9 s).

    python benchmarks/audit_speed.py [--workdir DIR] [--repeat 3] [--threads 1] [--models resnet50 vit_b16]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = ("resnet50", "vit_b16")
TARGET_FULL_S = {"resnet50": 5.0, "vit_b16": 15.0}
ONNX_TOOL_ANCHOR_S = {"resnet50": 0.2, "vit_b16": 0.9}
PHASES = """
import json, sys, time
t0 = time.perf_counter()
from pai_compiler.audit import audit_graph
from pai_compiler.api import load_model
t1 = time.perf_counter()
graph = load_model(sys.argv[1])
t2 = time.perf_counter()
doc = audit_graph(graph, paths=sys.argv[2] == "full")
t3 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "load": t2 - t1, "audit": t3 - t2, "torch": "torch" in sys.modules}))
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


def export(name: str, folder: Path) -> Path:
    path = folder / f"{name}.onnx"
    if not path.exists():
        import torch

        from pai_compiler.backends.torch_onnx import export_onnx
        from pai_compiler.lab import zoo

        torch.manual_seed(0)
        print(f"exporting {name} to {path} ...", flush=True)
        export_onnx(zoo.build(name), zoo.input_shape(name), path)
    return path


def child_env(threads: int, extra_path: str | None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), COLUMNS="200")
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, env.get("PYTHONPATH", "")]))
    return env


def run_child(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Wall, CPU and peak RSS of one child process; its stdout is returned."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.read().decode().strip()[-500:]}")
        out.seek(0)
        return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024, "stdout": out.read().decode()}


def repeat(cmd: list[str], env: dict[str, str], times: int) -> dict[str, Any]:
    runs = [run_child(cmd, env) for _ in range(times)]
    walls = [r["wall"] for r in runs]
    return {"best": min(walls), "median": statistics.median(walls), "cpu": min(r["cpu"] for r in runs),
            "rss_mb": max(r["rss_mb"] for r in runs), "stdout": runs[0]["stdout"]}


def gemm_macs(path: Path) -> tuple[int, int]:
    """(conv + linear + matmul MACs, all MACs) at batch 1, from the flops pass."""
    from pai_compiler.frontends.onnx.reader import load_onnx_model
    from pai_compiler.pass_infra import AnalysisManager
    from pai_compiler.passes.analysis.flops import FlopsPass, evaluate

    res = AnalysisManager(load_onnx_model(path)).get(FlopsPass(effective=False))
    gemm = sum(evaluate(r.dense) for r in res.nodes if r.kind in ("conv", "linear", "matmul"))
    return gemm, evaluate(res.dense)


def onnx_tool_times(path: Path, env: dict[str, str], times: int, extra_path: str | None) -> dict[str, float] | None:
    if extra_path and extra_path not in sys.path:
        sys.path.insert(0, extra_path)
    if importlib.util.find_spec("onnx_tool") is None:
        return None
    whole = repeat([sys.executable, "-c", ONNX_TOOL, str(path)], env, times)
    same = min(float(run_child([sys.executable, "-c", ONNX_TOOL, str(path)], env)["stdout"].split()[1]) for _ in range(times))
    return {"whole": whole["best"], "cpu": whole["cpu"], "same": same}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "paic-audit-bench")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--onnx-tool-path", default=None, help="folder holding onnx_tool (e.g. a pip --target)")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = child_env(args.threads, args.onnx_tool_path)
    rows: list[list[str]] = []
    failed = []
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {args.threads} thread(s); best of {args.repeat}")
    for name in args.models:
        path = export(name, args.workdir)
        gemm, total = gemm_macs(path)
        print(f"{name}: conv+linear+matmul MACs {gemm:,}; all nodes {total:,} (batch 1)")
        tool = onnx_tool_times(path, env, args.repeat, args.onnx_tool_path)
        baseline = tool["same"] if tool else ONNX_TOOL_ANCHOR_S[name]
        for mode, flags in (("--no-paths", ["--no-paths"]), ("full", [])):
            cli = repeat([sys.executable, "-m", "pai_compiler.cli", "audit", str(path), "--json", *flags], env, args.repeat)
            phases = json.loads(run_child([sys.executable, "-c", PHASES, str(path), "full" if mode == "full" else "fast"], env)["stdout"])
            in_process = phases["load"] + phases["audit"]
            if mode == "full":
                target, ok = f"< {TARGET_FULL_S[name]:.0f} s", cli["cpu"] < TARGET_FULL_S[name]
            else:
                target, ok = f"≤ 2× onnx-tool ({2 * baseline:.2f} s)", in_process <= 2 * baseline
            failed += [] if ok else [f"{name} {mode}"]
            rows.append([name, mode, f"{cli['best']:.2f}", f"{cli['median']:.2f}", f"{cli['cpu']:.2f}", f"{cli['rss_mb']:.0f}",
                         f"{phases['imports']:.2f}/{phases['load']:.2f}/{phases['audit']:.2f}", str(phases["torch"]), target, "ok" if ok else "MISSED"])
        if tool:
            rows.append([name, "onnx-tool", f"{tool['whole']:.2f}", "", f"{tool['cpu']:.2f}", "", f"-/{tool['same']:.2f} (profile)", "", "", ""])
        else:
            rows.append([name, "onnx-tool", "n/a", "", "", "", f"anchor ≈{ONNX_TOOL_ANCHOR_S[name]} s", "", "", ""])
    header = ["model", "mode", "wall best s", "wall med s", "CPU s", "peak RSS MB", "imports/load/audit s", "torch", "target", "verdict"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)))
    print("full-audit target judged on CPU time (= quiet single-thread wall); --no-paths on same-process load+audit vs onnx-tool")
    if failed:
        print("missed:", ", ".join(failed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
