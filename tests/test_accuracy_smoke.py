"""Smoke test of the accuracy benchmark: one tiny MNIST run through ``benchmarks/accuracy.py``'s own run function."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_modules import load_benchmark


REQUIRED_KEYS = {
    "dataset", "model", "method", "sparsity", "seed", "epochs", "schedule", "schedule_detail", "test_accuracy",
    "final_train_loss", "prune_seconds", "train_seconds", "threads", "commit", "paic_version", "pipeline", "timestamp",
    "density", "masked_nonzero", "history",
}


def test_accuracy_benchmark_smoke(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    acc = load_benchmark("accuracy")
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


def test_gpu_runs_have_their_own_files_and_tables(tmp_path: Path) -> None:
    acc = load_benchmark("accuracy")
    schedule = acc.make_schedule("short", acc.SUITES["cifar"][0])
    cpu = acc.RunSpec("cifar10", "resnet20", "dpai", 0.9, 0, schedule)
    gpu = acc.RunSpec("cifar10", "resnet20", "dpai", 0.9, 0, schedule, device="cuda:1")
    assert cpu.key == "cifar10_resnet20_dpai_sp90_seed0_short8ep" and gpu.key == cpu.key + "_cuda"
    assert {s.key for s in acc.build_grid(acc.SUITES["cifar"], ["dpai"], "short", device="cuda")} == {
        f"cifar10_resnet20_dpai_sp{sp}_seed{seed}_short8ep_cuda" for sp in (90, 99) for seed in (0, 1)}

    report = load_benchmark("accuracy_report")
    base = {"dataset": "cifar10", "model": "resnet20", "method": "dpai", "sparsity": 0.9, "seed": 0, "epochs": 8,
            "schedule": "short", "final_train_loss": 0.7, "prune_seconds": 1.0, "train_seconds": 2.0, "density": 0.1}
    runs = [dict(base, test_accuracy=0.70, device="cpu", _file=cpu.key + ".json"),
            dict(base, test_accuracy=0.80, device="cuda", _file=gpu.key + ".json"),
            dict(base, test_accuracy=0.90, device="cuda:0", seed=1, _file="x.json")]
    blocks = report.group(runs)
    assert sorted(k[-1] for k in blocks) == ["cpu", "cuda"]  # never pooled across devices
    assert [r["test_accuracy"] for r in blocks[("cifar10", "resnet20", "short", 8, "cuda")]["0.9|dpai"]] == [0.80, 0.90]
    text = report.render_markdown(runs, acc)
    assert "8 epochs, on cpu" in text and "8 epochs, on cuda" in text
    assert "| 90% | **70.00 (n=1)** |" in text and "| 90% | **85.00 ± 7.07 (n=2)** |" in text
    assert "**cifar, cpu**: 1 of 32 planned runs present." in text and "**cifar, cuda**: 1 of 32 planned runs present." in text
