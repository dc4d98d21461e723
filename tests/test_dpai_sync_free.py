"""After warm-up a DPaI step (channel R_P, kernel state) reads nothing back to the host.

Counted with the torch profiler (``aten::item``, ``aten::_local_scalar_dense``, ``aten::nonzero``,
``aten::is_nonzero``) plus every ``Tensor.tolist``/``cpu``/``numpy`` call, as the difference
between a 50- and a 10-step run that read back the same number of times (one window). The tape
runs on the torch back-end, Adam on its host-free formula and the k-th largest by ``kthvalue``,
as on CUDA, so each of their ops is visible too (on the CPU the loop keeps the fused Adam, whose
step-count read is a load there, and numpy's partition, 6x faster than torch's there). The CPU's numpy
selection is checked against that device path, pick for pick.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import pai_compiler.passes.criteria.dpai.channel_program as channel_program
from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.pass_infra import PassManager
from pai_compiler.passes.analysis.bindings import sample_bindings
from pai_compiler.passes.criteria.dpai.driver import build, initial_scores
from pai_compiler.passes.criteria.dpai.fixed_pool import FixedPoolTopK
from pai_compiler.passes.criteria.dpai.kernel_state import KernelScores
from pai_compiler.passes.criteria.dpai.loop import KernelStep, optimise
from pai_compiler.passes.criteria.dpai.ops import TorchOps
from pai_compiler.passes.criteria.dpai.select import IncrementalTopK
from pai_compiler.pipeline import parse_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
SYNCS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero")


def _run(steps: int, monkeypatch: pytest.MonkeyPatch, allocation: str = "erk{sparsity=0.99}") -> tuple[Counter[str], Any]:
    monkeypatch.setattr(channel_program, "make_ops", lambda device: TorchOps(device))
    g = load_onnx_model(EXAMPLES / "resnet20.onnx")
    allocated = PassManager(parse_pipeline(allocation)).run(g)[0].report
    keep, patterns = dict(allocated.keep), dict(allocated.patterns)
    layout, _, update, step = build(g, g.prunable_params(), keep, "channel", 0.99, 0.5, "cpu", sample_bindings(g), "index", patterns)
    view = KernelScores(layout, initial_scores(layout, 0, "cpu"), "cpu")
    topk = FixedPoolTopK(layout, "cpu", host_partition=False, patterns=patterns)  # the device path: torch's kthvalue
    assert topk.order == IncrementalTopK(layout, "cpu", ties="index", patterns=patterns).order  # the kept-entry layout ``update`` was built for
    counts: Counter[str] = Counter()
    for name in ("tolist", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counting(self: torch.Tensor, *args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = optimise(view.offset, KernelStep(step.program, update), topk, update, steps=steps, lr=0.001, view=view, window=steps, host_free=True)
    monkeypatch.undo()
    for event in prof.key_averages():
        if event.key in SYNCS:
            counts[event.key] += event.count
    return counts, result


@pytest.mark.parametrize("allocation", ["erk{sparsity=0.99}", "erk{pattern=2:4}"])
def test_steps_after_warm_up_read_nothing_back(monkeypatch: pytest.MonkeyPatch, allocation: str) -> None:
    short, _ = _run(10, monkeypatch, allocation)
    long, result = _run(50, monkeypatch, allocation)
    assert result.topk["sync_free"] and result.topk["replays"] == 0
    extra = {key: long[key] - short[key] for key in set(long) | set(short)}
    assert all(v == 0 for v in extra.values()), f"host reads in 40 extra steps: {extra}"
    assert [row["step"] for row in result.trajectory] == [0, 50]


def test_host_free_adam_is_torch_adam() -> None:
    from pai_compiler.passes.criteria.dpai.loop import Adam

    mine, ref = torch.zeros(500, requires_grad=True), torch.zeros(500, requires_grad=True)
    ours, theirs = Adam(mine, 0.01, host_free=True), torch.optim.Adam([ref], lr=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        grad = torch.randn(500, generator=gen) * 10 ** torch.randint(-3, 3, (1,), generator=gen)
        mine.grad, ref.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(mine.detach(), ref.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("allocation", ["erk{sparsity=0.99}", "erk{pattern=2:4}"])
def test_numpy_selection_on_the_cpu_equals_the_device_path(allocation: str) -> None:
    """On CPU tensors the pool selection, drift and room (and the N:M layers' group ranks) run in
    numpy: the same picks every step (same final mask, trajectory and refills) as the torch path a device runs."""
    g = load_onnx_model(EXAMPLES / "resnet20.onnx")
    allocated = PassManager(parse_pipeline(allocation)).run(g)[0].report
    keep, patterns = dict(allocated.keep), dict(allocated.patterns)
    runs = []
    for host in (True, False):
        layout, _, update, step = build(g, g.prunable_params(), keep, "channel", 0.99, 0.5, "cpu", sample_bindings(g), "index", patterns)
        view = KernelScores(layout, initial_scores(layout, 3, "cpu"), "cpu")
        topk = FixedPoolTopK(layout, "cpu", host_partition=host, patterns=patterns)
        result = optimise(view.offset, KernelStep(step.program, update), topk, update, steps=120, lr=0.005, view=view, record_every=20)
        runs.append((result.kept.index.clone(), result.trajectory, topk.rebuilds, topk.tie_events))
    (idx_host, traj_host, refills_host, ties_host), (idx_dev, traj_dev, refills_dev, ties_dev) = runs
    assert torch.equal(idx_host, idx_dev) and traj_host == traj_dev
    assert (refills_host, ties_host) == (refills_dev, ties_dev) and (refills_host > 1 or patterns)  # 2:4: one pooled layer (the 3-channel conv)
