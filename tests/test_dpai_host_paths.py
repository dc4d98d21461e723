"""The CPU's numpy fast paths of DPaI equal the paths they replace, bit for bit.

``HostKernelStep`` (the kernel-state step in numpy) against ``KernelStep`` (torch) over 120 steps
(ResNet-20, and a model with dead taps);
``HostMatVec`` (the tape's bound numpy mv layer) against the generic ``Weighted`` on one
forward/backward; ``RaggedPools`` (the host top-k over the pools' real entries) against a sort of
each row, ties included.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import pai_compiler.passes.criteria.dpai.channel_program as channel_program
from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.ir import Graph, GraphBuilder
from pai_compiler.pass_infra import PassManager
from pai_compiler.passes.analysis.bindings import sample_bindings
from pai_compiler.passes.criteria.dpai.driver import build, initial_scores
from pai_compiler.passes.criteria.dpai.fixed_pool import FixedPoolTopK
from pai_compiler.passes.criteria.dpai.host_select import RaggedPools
from pai_compiler.passes.criteria.dpai.host_step import HostKernelStep
from pai_compiler.passes.criteria.dpai.host_tape import HostMatVec
from pai_compiler.passes.criteria.dpai.kernel_state import KernelScores
from pai_compiler.passes.criteria.dpai.loop import KernelStep, optimise
from pai_compiler.pipeline import parse_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"


def _resnet20() -> tuple[Graph, dict[str, int]]:
    g = load_onnx_model(EXAMPLES / "resnet20.onnx")
    keep = dict(PassManager(parse_pipeline("erk{sparsity=0.99}")).run(g)[0].report.keep)
    return g, keep


def _dead_taps() -> tuple[Graph, dict[str, int]]:
    """3x3 convs on 2x2 and 1x1 maps (dead taps: the live-tap weights of the counts and scores)."""
    b = GraphBuilder("tiny")
    x = b.conv(b.input((1, 3, 4, 4)), 16, 3, pad=1)
    x = b.conv(x, 16, 3, stride=2, pad=1)
    x = b.conv(x, 12, 3, stride=2, pad=1)
    g = b.build(b.linear(b.flatten(x), 4))
    return g, dict(PassManager(parse_pipeline("erk{sparsity=0.6}")).run(g)[0].report.keep)


@pytest.mark.parametrize("model,lr", [("resnet20", 0.005), ("dead_taps", 0.05)])
def test_host_step_equals_the_torch_kernel_step(model: str, lr: float) -> None:
    g, keep = _resnet20() if model == "resnet20" else _dead_taps()
    runs = []
    for host in (True, False):
        layout, _, update, step = build(g, g.prunable_params(), keep, "channel", 0.99, 0.5, "cpu", sample_bindings(g), "index")  # type: ignore[arg-type]
        assert bool(layout.tap_live) == (model == "dead_taps")
        view = KernelScores(layout, initial_scores(layout, 3, "cpu"), "cpu")
        kstep = HostKernelStep(step.program, update) if host else KernelStep(step.program, update)
        prepare = kstep.kept if isinstance(kstep, HostKernelStep) else None
        result = optimise(view.offset, kstep, FixedPoolTopK(layout, "cpu"), update, steps=120, lr=lr, view=view, record_every=20, prepare=prepare)
        runs.append((result.kept.index.clone(), result.trajectory, view.offset.detach().clone(), view.lift.clone()))
    (idx_h, traj_h, off_h, lift_h), (idx_t, traj_t, off_t, lift_t) = runs
    assert torch.equal(idx_h, idx_t) and traj_h == traj_t
    assert torch.equal(off_h, off_t) and torch.equal(lift_h, lift_t)  # every Adam step saw the same gradient
    assert len(traj_h) == 7 and traj_h[-1]["nodes"] > 0


def test_host_matvec_equals_weighted(monkeypatch: pytest.MonkeyPatch) -> None:
    g, keep = _resnet20()
    programs = []
    for bound in (True, False):
        if not bound:
            monkeypatch.setattr(channel_program, "host_matvec_applies", lambda *args: False)
        layout, _, _, step = build(g, g.prunable_params(), keep, "channel", 0.99, 0.5, "cpu", sample_bindings(g), "index")  # type: ignore[arg-type]
        programs.append(step.program)
    with_bound, generic = programs
    assert sum(isinstance(i, HostMatVec) for i in with_bound.tape) >= 19 and not any(isinstance(i, HostMatVec) for i in generic.tape)
    gen = torch.Generator().manual_seed(1)
    counts = torch.randint(0, 4, with_bound.counts.shape, generator=gen).float()
    counts[:50] = 9.0  # equal inputs: ties at the max
    outs = []
    for program in programs:
        program.counts.copy_(counts)
        outs.append((program.forward_backward(), program.grad.clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert bool((outs[0][1] != 0).any())


def _sorted_picks(flat: np.ndarray, vals: np.ndarray, lengths: list[int], keeps: list[int]) -> tuple[np.ndarray, np.ndarray, int]:
    """Per row: the k largest by a stable sort (descending value, then position), in row order."""
    picks, kths, tied, start = [], [], 0, 0
    for length, keep in zip(lengths, keeps):
        row = vals[start : start + length]
        order = sorted(range(length), key=lambda i: (-float(row[i]), i))
        kths.append(row[order[keep - 1]])
        tied += int(row[order[keep]] == row[order[keep - 1]])
        picks.append(flat[start : start + length][np.sort(np.asarray(order[:keep]))])
        start += length
    return np.concatenate(picks), np.asarray(kths, dtype=np.float32), tied


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ragged_pools_pick_as_a_sort_does(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows, width = 7, 60
    keeps = rng.integers(1, 20, rows)
    lengths = np.minimum(width, keeps + rng.integers(1, 45, rows))
    pad = np.arange(width)[None, :] >= lengths[:, None]
    pool = np.sort(rng.choice(10_000, (rows, width), replace=False), axis=1)
    pool[pad] = 0
    ragged = RaggedPools(pool, pad, keeps)
    assert RaggedPools.fits(pad, keeps) and ragged.flat.size == int(lengths.sum())
    for _ in range(5):
        vals = rng.integers(0, 6, ragged.flat.size).astype(np.float32)  # few distinct values: ties everywhere
        picks, kth, tied = ragged.picks(vals)
        want_picks, want_kth, want_tied = _sorted_picks(ragged.flat, vals, [int(n) for n in lengths], [int(k) for k in keeps])
        assert np.array_equal(picks, want_picks) and np.array_equal(kth, want_kth) and tied == want_tied
    assert not RaggedPools.fits(pad, lengths)  # a row keeping all it holds goes to the padded path
