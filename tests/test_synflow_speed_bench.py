"""Smoke test of ``benchmarks/synflow_speed.py``: ResNet-20 for two rounds, one process per run and alternating in one process."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from bench_modules import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_synflow_speed_bench_times_rounds_and_alternates(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_benchmark("synflow_speed")
    # this checkout as its own baseline: both code paths of the benchmark run, and the two timings are comparable
    assert bench.main(["--models", "resnet20", "--rounds", "2", "--baseline", str(ROOT), "--alternate", "1"]) == 0
    out = capsys.readouterr().out
    assert "failed" not in out
    rows = [line for line in out.splitlines() if line.startswith("| resnet20 |")]
    assert len(rows) == 3, out  # before and after, one process each; then the same-process row
    cpu_per_round = float(rows[1].split("|")[4])
    assert 0 < cpu_per_round < 5, rows[1]
    assert re.search(r"\| [0-9.]+× \|", rows[2]), rows[2]
