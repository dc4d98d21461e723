"""The non-timing logic of ``benchmarks/latency_accuracy.py``: mask rebuild and digest, the reproduction check, the tables.

One tiny case (MNIST LeNet-300-100, random-ERK 90 %): the mask rebuilt with the current recipe
must equal the one the accuracy benchmark's own ``run_one`` trains (training intercepted, as for
a run's commit), and the check must tell reproduced, changed-code, wrong-density and GPU-only
runs apart; the rendered tables plot only the reproduced runs and name each one's fastest form.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bench_modules import load_benchmark

from pai_compiler.pipeline import format_pipeline, parse_pipeline

ROOT = Path(__file__).resolve().parents[1]


run_masks = load_benchmark("run_masks")
report = load_benchmark("latency_accuracy_report")


def _record(path: Path, *, method: str, seed: int, density: float, commit: str, device: str = "cpu", acc: float = 0.9) -> None:
    path.write_text(json.dumps({"dataset": "mnist", "model": "lenet300", "method": method, "sparsity": 0.9, "seed": seed,
                                "device": device, "commit": commit, "pipeline": f"erk{{sparsity=0.9}},{method}",
                                "density": density, "test_accuracy": acc, "limit_train": None}))


def test_mask_digest_sees_every_bit_and_ignores_order() -> None:
    masks = {"b.weight": np.ones((3, 4), bool), "a.weight": np.eye(4, dtype=bool)}
    assert run_masks.mask_digest(masks) == run_masks.mask_digest(dict(reversed(list(masks.items()))))
    flipped = {**masks, "a.weight": masks["a.weight"].copy()}
    flipped["a.weight"][0, 1] = True
    assert run_masks.mask_digest(flipped) != run_masks.mask_digest(masks)
    assert run_masks.mask_digest({"a.weight": np.ones((2, 6), bool)}) != run_masks.mask_digest({"a.weight": np.ones((3, 4), bool)})


def test_reproducing_options_give_a_valid_pipeline() -> None:
    text = run_masks.reproducing_pipeline(run_masks.MaskCase("cifar10", "resnet20", "dpai", 0.99, 0))
    assert text == "erk{sparsity=0.99},dpai{state=weights}" and format_pipeline(parse_pipeline(text)) == text
    assert run_masks.reproducing_pipeline(run_masks.MaskCase("cifar10", "resnet20", "snip", 0.99, 0)) is None


def test_rebuild_matches_the_benchmarks_own_run_and_the_check_tells_runs_apart(
        tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    case = run_masks.MaskCase("mnist", "lenet300", "random-erk", 0.9, 0)
    rebuilt = run_masks.rebuild(case, data_dir)
    other = run_masks.rebuild(run_masks.MaskCase("mnist", "lenet300", "random-erk", 0.9, 1), data_dir)
    assert rebuilt.digest != other.digest and abs(rebuilt.density - 0.1) < 0.01

    # the tree's own accuracy.run_one, training intercepted: what digests_at_commit runs on a run's commit
    training = importlib.import_module("pai_compiler.lab.training")
    monkeypatch.setattr(training, "train", training.train)  # restored after the interception replaced it
    run_masks._digest_tree(ROOT, [["mnist", "lenet300", "random-erk", 0.9, 0, "cpu"]], data_dir)
    at_commit = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert at_commit == {"key": case.key, "digest": rebuilt.digest, "density": rebuilt.density}

    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    _record(runs_dir / "a_same.json", method="random-erk", seed=0, density=rebuilt.density, commit="c_same")
    _record(runs_dir / "b_changed.json", method="random-erk", seed=0, density=rebuilt.density, commit="c_changed")
    _record(runs_dir / "c_density.json", method="random-erk", seed=0, density=0.2, commit="c_same")
    _record(runs_dir / "d_gpu.json", method="snip", seed=0, density=rebuilt.density, commit="c_same", device="cuda")
    _record(runs_dir / "e_gpu_free.json", method="random-erk", seed=0, density=rebuilt.density, commit="c_same", device="cuda")
    _record(runs_dir / "f_nocommit.json", method="random-erk", seed=0, density=rebuilt.density, commit="c_missing")
    runs = {run.file: run for run in run_masks.load_runs(runs_dir, dataset="mnist", model="lenet300")}
    store: dict[str, Any] = {"masks": {case.key: rebuilt.summary()}, "at_commit": {
        "c_same": {case.key: {"digest": at_commit["digest"]}}, "c_changed": {case.key: {"digest": other.digest}}}}
    checks = {name: run_masks.check_run(run, store["masks"].get(run.case().key),
                                        store["at_commit"].get(run.commit, {}).get(run.case().key)) for name, run in runs.items()}
    assert {name: c.status for name, c in checks.items()} == {
        "a_same.json": "reproduced", "b_changed.json": "differs", "c_density.json": "differs", "d_gpu.json": "needs GPU",
        "e_gpu_free.json": "reproduced", "f_nocommit.json": "unverified"}

    # tables: timings by digest; only the reproduced runs are plotted, each naming its fastest form
    store["timings"] = {rebuilt.digest: {"1": {"dense_ort_ms": 2.0, "form_ms": {"masked ORT": 2.0, "compact ORT": 1.0,
                                                                                "sparse torch": 0.5},
                                               "fastest": "sparse torch", "threads": 1, "runs": 9, "warmup": 2}}}
    rows = report.run_rows(list(runs.values()), store)
    assert sorted(r.run.file for r in rows if r.plotted) == ["a_same.json", "e_gpu_free.json"]
    assert all(r.speedup("1") == 4.0 for r in rows if r.plotted)
    text = report.render_markdown(rows, store)
    per_run = text[text.index("## Per run"):]
    assert per_run.count("| sparse torch |") == 2 and "| 1.00 | 2.00 | 4.00 | sparse torch |" in per_run
    for name in ("b_changed.json", "c_density.json", "d_gpu.json", "f_nocommit.json"):
        assert f"| {name} |" in text[text.index("## Mask reproduction"):text.index("## Per cell")]
