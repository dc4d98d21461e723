"""DPaI speed: ms per step for paths=channel/ref/exact on ResNet-20, VGG-19, ResNet-18 (CIFAR
shapes) and, with ``--models``, ResNet-50 and ViT-B/16 at 224x224 (``resnet50``, ``vit_b16``) and
the onnx wheel's light real architectures at 224x224 (``alexnet``, ``vgg19_224``, ``resnet50_onnx``,
``zfnet512``: Caffe-zoo exports whose weights are ConstantOfShape nodes, read in place from the
installed ``onnx`` package, never copied).

Each (model, mode) runs in a fresh subprocess (clean peak memory): ``erk{sparsity=S},dpai{...}``
on an ONNX export of the zoo model (built into a temporary directory). Reported: loop seconds
and ms/step (wall), the loop's CPU ms/step (this thread; on a shared machine the wall time also
counts the other jobs), the estimates for 100 and 3000 steps, the ratio to ``channel`` and to ResNet-20's channel
step, peak RSS (CPU) or peak CUDA memory and its growth during the run per prunable weight
(bytes/weight), the state kept (full, band, weights), and the final mask's per-pixel
reference-convention log P~, nodes, kernels, effective params and exact log paths (after the
steps run, which for the slow modes is fewer than 3000). ``--seeds 0 1 2`` repeats each run per
seed (trajectory spread).

    python benchmarks/dpai_speed.py                                  # all models and modes, CPU
    python benchmarks/dpai_speed.py --models resnet20 --modes channel --steps 3000 --seeds 0 1 2
    python benchmarks/dpai_speed.py --device cuda --models resnet20 resnet50 vit_b16 --modes channel
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules
from bench_setup import export_zoo_model, onnx_light_model  # noqa: E402
MODELS = ("resnet20", "vgg19", "resnet18")
BIG = ("resnet50", "vit_b16")
#: the onnx wheel's light models (backend test data): name -> file stem
LIGHT = {"alexnet": "light_bvlc_alexnet", "vgg19_224": "light_vgg19", "resnet50_onnx": "light_resnet50", "zfnet512": "light_zfnet512"}
ZOO = MODELS + BIG + tuple(LIGHT)
MODES = ("channel", "ref", "exact")
#: default steps per (model, mode): 3000 where affordable, a sample elsewhere
DEFAULT_STEPS = {
    ("resnet20", "channel"): 3000, ("resnet20", "ref"): 200, ("resnet20", "exact"): 100,
    ("vgg19", "channel"): 200, ("vgg19", "ref"): 5, ("vgg19", "exact"): 3,
    ("resnet18", "channel"): 200, ("resnet18", "ref"): 5, ("resnet18", "exact"): 3,
    **{(m, "channel"): 100 for m in BIG + tuple(LIGHT)}, **{(m, "ref"): 2 for m in BIG + tuple(LIGHT)}, **{(m, "exact"): 1 for m in BIG + tuple(LIGHT)},
}


def export(model: str, directory: Path) -> Path:
    """The ONNX file of ``model``: an onnx-wheel light model in place, or the zoo model exported into ``directory``."""
    return onnx_light_model(LIGHT[model]) if model in LIGHT else export_zoo_model(model, directory)


def run_one(path: Path, mode: str, steps: int, sparsity: float, device: str, threads: int, seed: int = 0) -> dict[str, Any]:
    """In the child: run the pass once and measure."""
    import torch

    from pai_compiler.frontends.onnx.reader import load_onnx_model
    from pai_compiler.pass_infra import AnalysisManager, PassManager, RunContext
    from pai_compiler.pipeline import parse_pipeline

    torch.set_num_threads(threads)
    loop_cpu = _time_loop_cpu()
    graph = load_onnx_model(path)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    spec = f"erk{{sparsity={sparsity}}},dpai{{steps={steps},paths={mode},device={device}}}"
    records = PassManager(parse_pipeline(spec)).run(graph, AnalysisManager(graph, RunContext(seed=seed, device=device)))
    total = time.perf_counter() - start
    report = records[-1].report
    out = {
        "steps": steps, "loop_s": report.seconds, "ms_per_step": report.ms_per_step, "total_s": total, "loop_cpu_s": loop_cpu[0],
        "threads": report.threads, "final": report.final, "topk": report.topk, "state": report.state, "seed": seed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_rss_mb": base_rss,
        "params": sum(p.numel for p in graph.prunable_params()),
    }
    if device.startswith("cuda"):
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _time_loop_cpu() -> list[float]:
    """The loop's CPU seconds (this thread), filled in as the pass runs: on a shared machine the
    wall time counts the other jobs' share of the core, the CPU time much less so."""
    from pai_compiler.passes.criteria.dpai import driver

    spent = [0.0]
    optimise = driver.optimise

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return optimise(*args, **kwargs)
        finally:
            spent[0] += time.thread_time() - start

    driver.optimise = timed  # type: ignore[assignment]
    return spent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(ZOO))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--steps", type=int, default=None, help="steps for every run (default: per model/mode table)")
    parser.add_argument("--sparsity", type=float, default=0.99)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--one", nargs=4, metavar=("ONNX", "MODE", "STEPS", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(Path(args.one[0]), args.one[1], int(args.one[2]), args.sparsity, args.device, args.threads, int(args.one[3]))))
        return 0

    import torch

    print(f"DPaI speed @ sparsity {args.sparsity}, device {args.device}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            path = export(model, Path(tmp))
            for mode in args.modes:
                steps = args.steps or DEFAULT_STEPS[(model, mode)]
                for seed in args.seeds:
                    r = _child(path, mode, steps, seed, args)
                    if r is None:
                        print(f"  {model} {mode} seed {seed}: FAILED", flush=True)
                        continue
                    results.setdefault(model, {}).setdefault(mode, []).append(r)
                    f = r["final"]
                    print(f"  {model:13s} {mode:8s} seed {seed} {steps:5d} steps  {r['ms_per_step']:9.2f} ms/step  loop {r['loop_s']:7.1f} s (cpu {r['loop_cpu_s']:.1f} s)  "
                          f"nodes {f['nodes']} kernels {f['kernels']} params {f['params']}", flush=True)
    print()
    _table(results, args.device)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))
    return 0


def _child(path: Path, mode: str, steps: int, seed: int, args: argparse.Namespace) -> dict[str, Any] | None:
    """One run in a fresh interpreter (clean peak memory); None when it failed (stderr shown)."""
    cmd = [sys.executable, __file__, "--one", str(path), mode, str(steps), str(seed), "--sparsity", str(args.sparsity), "--device", args.device, "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode:
        print(proc.stderr[-2000:], flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(results: dict[str, dict[str, list[dict[str, Any]]]], device: str) -> None:
    """Per (model, mode, seed): cost, ratios to channel and to ResNet-20's channel step, memory, metrics."""
    mem = "peak CUDA MB" if device.startswith("cuda") else "peak RSS MB"
    head = (f"{'model':13s} {'mode':8s} {'seed':>4s} {'weights':>8s} {'state':>7s} {'steps':>6s} {'ms/step':>9s} {'100 steps':>10s} {'cpu ms/st':>9s} {'3000 steps':>11s} "
            f"{'vs channel':>10s} {'vs r20':>8s} {mem:>12s} {'B/weight':>8s} {'log P~':>8s} {'exact':>7s} {'nodes':>6s} {'kernels':>8s} {'params':>7s}")
    print(head)
    print("-" * len(head))
    r20 = results.get("resnet20", {}).get("channel", [{}])[0].get("ms_per_step")
    for model, modes in results.items():
        base = modes.get("channel", [{}])[0].get("ms_per_step")
        for mode, runs in modes.items():
            for r in runs:
                f = r["final"]
                ratio = f"{r['ms_per_step'] / base:9.1f}x" if base else "         -"
                vs_r20 = f"{r['ms_per_step'] / r20:7.1f}x" if r20 else "       -"
                peak = r.get("peak_cuda_mb", r["peak_rss_mb"])
                grown = r["peak_cuda_mb"] if "peak_cuda_mb" in r else r["peak_rss_mb"] - r["base_rss_mb"]
                per_weight = grown * 2**20 / max(r["params"], 1)
                exact = f["log_paths_exact"] if f["log_paths_exact"] is not None else float("nan")
                print(f"{model:13s} {mode:8s} {r['seed']:4d} {r['params'] / 1e6:7.2f}M {r['state']:>7s} {r['steps']:6d} {r['ms_per_step']:9.2f} {r['ms_per_step'] / 10:9.1f}s "
                      f"{1000 * r['loop_cpu_s'] / max(r['steps'], 1):9.2f} {r['ms_per_step'] * 3:10.1f}s {ratio:>10s} {vs_r20:>8s} {peak:12.0f} {per_weight:8.1f} {f['log_paths'] or float('nan'):8.2f} {exact:7.2f} {f['nodes']:6d} {f['kernels']:8d} {f['params']:7d}")
        if "channel" in modes and len(modes["channel"]) > 1:
            runs = modes["channel"]
            mean = {k: sum(r["final"][k] for r in runs) / len(runs) for k in ("nodes", "kernels", "params")}
            print(f"{model:13s} channel mean of {len(runs)} seeds: nodes {mean['nodes']:.1f} kernels {mean['kernels']:.1f} params {mean['params']:.1f}")


if __name__ == "__main__":
    sys.exit(main())
