"""Scale benchmark: `paic optimize` on a ViT-B/16-sized ONNX (86M params) and a >2 GB model.

Each run is a separate process; wall time and peak RSS come from the kernel's accounting of
that child (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` measured in a fresh wrapper
process per run). The target is peak RSS < 3x the size of the weights.

The >2 GB model is an MLP of Gemm layers whose weights live in one external-data file written
tensor by tensor, so building it needs little memory.

    python benchmarks/scale.py [--workdir /tmp/paic_scale] [--methods magnitude,dpai] [--big-gb 2.2] [--out docs/scale.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MEASURE = r"""
import json, resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": proc.returncode, "wall_s": wall, "peak_rss": rss, "stderr": proc.stderr[-500:]}))
"""


def measure(cmd: list[str]) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_vit(path: Path) -> int:
    import torch

    from pai_compiler.lab import zoo
    from pai_compiler.backends.torch_onnx import export_onnx

    if not path.exists():
        torch.manual_seed(0)
        export_onnx(zoo.build("vit_b16"), zoo.input_shape("vit_b16"), path)
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))


def build_big_mlp(path: Path, target_gb: float, width: int = 8192) -> int:
    """Gemm chain with external data, written one tensor at a time."""
    import onnx
    from onnx import TensorProto, helper

    data = path.with_name(path.name + ".data")
    layers = max(1, int(np.ceil(target_gb * 2**30 / (width * width * 4))))
    if path.exists() and data.exists():
        return path.stat().st_size + data.stat().st_size
    nodes, inits, offset = [], [], 0
    rng = np.random.default_rng(0)
    with open(data, "wb") as fh:
        for i in range(layers):
            w = (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)).astype(np.float32)
            fh.write(w.tobytes())
            t = TensorProto()
            t.name, t.data_type = f"fc{i}.weight", TensorProto.FLOAT
            t.dims.extend(w.shape)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(w.nbytes))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
            offset += w.nbytes
            inits.append(t)
            src = "x" if i == 0 else f"r{i - 1}"
            out = "y" if i == layers - 1 else f"h{i}"
            nodes.append(helper.make_node("Gemm", [src, f"fc{i}.weight"], [out], transB=1, name=f"fc{i}"))
            if i < layers - 1:
                nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
    graph = helper.make_graph(nodes, "big_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], inits)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(path))
    return path.stat().st_size + data.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/paic_scale")
    ap.add_argument("--methods", default="magnitude,dpai")
    ap.add_argument("--big-gb", type=float, default=2.2)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--skip-vit", action="store_true")
    ap.add_argument("--out", help="also write the markdown table (with the command and machine) to this file")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    paic = [sys.executable, "-m", "pai_compiler.cli"]
    models = [] if args.skip_vit else [("vit_b16 (86M)", work / "vit_b16.onnx", build_vit)]
    if not args.skip_big:
        models.append((f"mlp >{args.big_gb} GB", work / "big_mlp.onnx", lambda p: build_big_mlp(p, args.big_gb)))
    rows = []
    for label, path, builder in models:
        t = time.perf_counter()
        size = builder(path)
        print(f"built {label}: {size / 2**30:.2f} GiB in {time.perf_counter() - t:.1f} s", flush=True)
        for method in args.methods.split(","):
            extra = ["--steps", "10"] if method == "dpai" else []
            out = work / f"out_{path.stem}_{method}.onnx"
            res = measure([*paic, "optimize", str(path), "--method", method, "--sparsity", "0.9", "-o", str(out), "-q", "--force", *extra])
            ratio = res["peak_rss"] / size  # type: ignore[operator]
            rows.append((label, method, res["rc"], res["wall_s"], res["peak_rss"], size, ratio))
            print(f"  {method:10s} rc={res['rc']} wall {res['wall_s']:.1f} s  peak RSS {res['peak_rss'] / 2**30:.2f} GiB  = {ratio:.2f}x weights"
                  + (f"  stderr: {res['stderr']}" if res["rc"] else ""), flush=True)
            for f in work.glob(out.name + "*"):
                f.unlink()
    lines = [f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, OMP_NUM_THREADS=1; "
             f"command: python benchmarks/scale.py {' '.join(sys.argv[1:])}", "",
             "| model | method | rc | wall s | peak RSS GiB | weights GiB | RSS / weights |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {label} | {method} | {rc} | {wall:.1f} | {rss / 2**30:.2f} | {size / 2**30:.2f} | {ratio:.2f} |"
              for label, method, rc, wall, rss, size, ratio in rows]
    print("\n" + "\n".join(lines))
    if args.out:
        Path(args.out).write_text("# Scale: peak memory of `paic optimize` on big models\n\n"
                                  "Peak RSS of the whole `paic optimize ... --sparsity 0.9` process (kernel accounting of the child), "
                                  "against the size of the model's weights; target < 3x.\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
