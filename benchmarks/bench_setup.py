"""What the speed benchmarks share: the machine line of a report, zoo and onnx light models, the pruning pipeline, a measured child process.

``run_measured(cmd, env)`` runs one child in a scratch folder and reads its own rusage from
``os.wait4``: wall seconds, CPU seconds (user + sys, a single thread's quiet wall time and robust
to a busy machine) and peak RSS in MiB (``ru_maxrss`` / 1024).
"""
from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ChildRun", "machine", "export_zoo_model", "onnx_light_model", "pipeline_for", "run_measured"]


@dataclass(frozen=True)
class ChildRun:
    """One child process: exit code, wall and CPU seconds, peak RSS (MiB), its stdout and stderr."""

    code: int
    wall: float
    cpu: float
    rss_mb: float
    stdout: str
    stderr: str


def machine() -> dict[str, str]:
    """The machine a report was measured on: CPU model, cores, Python/torch/onnxruntime versions, load average."""
    import onnxruntime  # heavy: only the benchmarks that time ONNX Runtime describe it
    import torch  # heavy: as above

    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "load_average": " ".join(f"{v:.1f}" for v in os.getloadavg())}


def export_zoo_model(name: str, folder: Path) -> Path:
    """``folder/<name>.onnx``: the zoo model ``name`` (seed 0) exported the first time it is asked for."""
    path = folder / f"{name}.onnx"
    if not path.exists():
        import torch  # heavy: only to export a zoo model once

        from pai_compiler.backends.torch_onnx import export_onnx
        from pai_compiler.lab import zoo

        torch.manual_seed(0)
        print(f"exporting {name} to {path} ...", flush=True)
        export_onnx(zoo.build(name), zoo.input_shape(name), path)
    return path


def pipeline_for(method: str, sparsity: float, dpai_steps: int) -> str:
    """The pipeline a speed benchmark prunes with: ERK densities, then the method (layer scope where it has one);
    ``dpai-latNN`` is DPaI with the latency knob at NN/100 (``dpai{latency=0.5}`` for dpai-lat50)."""
    if method == "dpai":
        return f"erk{{sparsity={sparsity}}},dpai{{steps={dpai_steps}}}"
    if method.startswith("dpai-lat"):
        return f"erk{{sparsity={sparsity}}},dpai{{steps={dpai_steps},latency={int(method[len('dpai-lat'):]) / 100}}}"
    if method == "random-erk":
        return f"erk{{sparsity={sparsity}}},random-erk"
    return f"erk{{sparsity={sparsity}}},{method}{{scope=layer}}"


def onnx_light_model(stem: str) -> Path:
    """``<stem>.onnx`` of the installed onnx wheel's light models (real architectures whose weights are
    ConstantOfShape nodes: read in place, never copied); a one-line exit when this wheel lacks it."""
    import onnx  # heavy: only to locate its backend test data

    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"{stem}.onnx"
    if not path.exists():
        raise SystemExit(f"{path} is missing (this onnx wheel has no light models); leave {stem} out")
    return path


def run_measured(cmd: list[str], env: dict[str, str]) -> ChildRun:
    """Run ``cmd`` in the temp folder (``python -c`` puts the working folder first on sys.path) with its own rusage."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=tempfile.gettempdir())
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return ChildRun(os.waitstatus_to_exitcode(status), wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024,
                        out.read().decode(), err.read().decode())
