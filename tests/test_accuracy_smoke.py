"""Smoke test of the accuracy benchmark: one tiny MNIST run through ``benchmarks/accuracy.py``'s own run function."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

REQUIRED_KEYS = {
    "dataset", "model", "method", "sparsity", "seed", "epochs", "schedule", "schedule_detail", "test_accuracy",
    "final_train_loss", "prune_seconds", "train_seconds", "threads", "commit", "paic_version", "pipeline", "timestamp",
    "density", "masked_nonzero", "history",
}


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("paic_bench_accuracy", ROOT / "benchmarks" / "accuracy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_accuracy_benchmark_smoke(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not (data_dir / "mnist.npz").is_file():
        pytest.skip(f"no MNIST at {data_dir}")
    acc = _load_benchmark()
    # LeNet-300-100 at 90 %, random-ERK masks, 2 short epochs on a 5k-image slice, one thread
    schedule = acc.Schedule("smoke", 0.1, 0.9, 1e-4, 64, "cosine", 2)
    spec = acc.RunSpec("mnist", "lenet300", "random-erk", 0.9, 0, schedule, limit_train=5000)
    results = tmp_path / "runs"
    status = acc.run_grid([spec], results, data_dir=data_dir, threads=1, progress=False)
    assert status["ran"] == [spec.key] and not status["failed"]
    path = acc.result_path(results, spec)
    record = json.loads(path.read_text())
    assert REQUIRED_KEYS <= set(record), REQUIRED_KEYS - set(record)
    assert record["test_accuracy"] > 0.8  # chance is 0.1
    assert record["masked_nonzero"] == 0
    assert abs(record["density"] - 0.1) < 0.01
    assert record["threads"] == 1 and record["train_samples"] == 5000 and record["epochs"] == 2
    assert not (results / ".locks").exists()  # the claim is released

    # a rerun skips the finished run (and does not touch its file)
    mtime = path.stat().st_mtime_ns
    again = acc.run_grid([spec], results, data_dir=data_dir, threads=1, progress=False)
    assert again["skipped"] == [spec.key] and not again["ran"]
    assert path.stat().st_mtime_ns == mtime

    # the grid is ordered seed-major and the dry run lists what exists
    grid = acc.build_grid(acc.SUITES["mnist"][:1], ["random-erk", "npb", "dpai"], "short", seeds=[0, 1])
    assert [s.seed for s in grid] == [0] * 12 + [1] * 12
    monkeypatch.setattr(acc, "SLOW_METHODS", frozenset({"npb"}))  # a slow method: last, first seed only
    grid = acc.build_grid(acc.SUITES["mnist"][:1], ["random-erk", "npb", "dpai"], "short", seeds=[0, 1])
    assert [s.seed for s in grid[:8]] == [0] * 8 and [s.seed for s in grid[8:16]] == [1] * 8
    assert [(s.method, s.seed) for s in grid[16:]] == [("npb", 0)] * 4
    assert acc.main(["--dry-run", "--models", "lenet300", "--methods", "random-erk", "--results-dir", str(results)]) == 0
