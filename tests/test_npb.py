"""NPB pass: per-layer integer programs (vs brute force), budgets, valid masks, fix-up, determinism."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from pai_compiler.errors import UsageError
from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.ir import Graph, GraphBuilder, OpKind
from pai_compiler.pass_infra import AnalysisManager, PassManager, RunContext
from pai_compiler.passes.allocation.base import Allocation
from pai_compiler.passes.analysis.node_path import NodePathPass
from pai_compiler.passes.criteria.npb.criterion import NpbReport
from pai_compiler.passes.criteria.npb.finetune import PathCounter, fine_tune
from pai_compiler.passes.criteria.npb.linear import solve_linear
from pai_compiler.passes.criteria.npb.milp import BlockProblem, max_path_bound, solve_block
from pai_compiler.pipeline import parse_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"


def _objective(prob: BlockProblem, counts: np.ndarray) -> float:
    """alpha*A + (1-alpha)*B + beta*Reg written out directly (algorithms.md §2.1)."""
    into = np.bincount(prob.kernel_in, weights=counts, minlength=prob.n_in)
    out = np.bincount(prob.kernel_out, weights=counts, minlength=prob.n_out)
    size = prob.n_in + prob.n_out
    a = (size - np.maximum(prob.min_n - into, 0).sum() - np.maximum(prob.min_n - out, 0).sum()) / size
    b = float((prob.p_in[prob.kernel_in] * counts).sum()) / max_path_bound(prob.p_in, prob.budget, prob.n_out, prob.max_p)
    reg = (prob.budget - np.maximum(1 - counts, 0).sum()) / prob.budget
    return prob.alpha * a + (1 - prob.alpha) * b + prob.beta * reg


@pytest.mark.parametrize("alpha,beta,budget", [(0.01, 1.0, 5), (0.9, 0.0, 4), (0.5, 0.3, 7)])
def test_block_program_matches_brute_force(alpha: float, beta: float, budget: int) -> None:
    n_in, n_out, max_p = 3, 2, 2
    kin = np.repeat(np.arange(n_in), n_out)
    kout = np.tile(np.arange(n_out), n_in)
    prob = BlockProblem(kin, kout, n_in, n_out, np.array([3.0, 1.0, 2.0]), budget, max_p, alpha, beta, 1)
    sol = solve_block(prob)
    assert sol.counts.sum() <= budget and sol.counts.max() <= max_p and sol.status == "optimal"
    best = max(_objective(prob, np.array(c)) for c in itertools.product(range(max_p + 1), repeat=n_in * n_out) if sum(c) <= budget)
    assert _objective(prob, sol.counts) == pytest.approx(best, abs=1e-6)


def test_max_path_bound_keeps_the_reference_quirk() -> None:
    p = np.array([1.0, 4.0, 2.0, 3.0])
    assert max_path_bound(p, budget=7, n_out=2, cap=3) == 4 * 6 + 1 * 3  # one channel full (6), then 1 on the next
    # budget below one channel: the reference's sort(P)[-0:] takes every channel
    assert max_path_bound(p, budget=5, n_out=2, cap=3) == 10 * 6 + 5 * 4


def test_resnet_like_budgets_valid_masks_and_record() -> None:
    g = load_onnx_model(EXAMPLES / "vgg_small.onnx")
    am = AnalysisManager(g, RunContext(seed=0))
    records = PassManager(parse_pipeline("erk{sparsity=0.99},npb{chunk_above=256,chunk=16}")).run(g, am)
    report = records[-1].report
    assert isinstance(report, NpbReport)
    alloc = am.provided(Allocation).keep
    for row in report.layers:  # each program spends its budget (blocks: ceil per block)
        assert alloc[row["layer"]] <= row["kept"] <= alloc[row["layer"]] + row["blocks"]
    assert any(row["blocks"] > 1 for row in report.layers)
    for p in g.prunable_params():
        assert p.mask is not None and p.mask.dtype == bool and p.mask.shape == p.shape
    kept = sum(p.kept() for p in g.prunable_params())
    assert kept == report.kept and abs(kept - report.allocated) <= 0.1 * report.allocated
    assert report.seconds > 0 and report.solve_seconds > 0
    paths = am.get(NodePathPass())
    convs = {p.name for p in g.prunable_params() if g.param_users(p)[0].kind is OpKind.CONV}
    for row in paths.layers:  # after the fix-up every kept conv weight lies on a path
        if row.param in convs:
            assert row.effective_params == next(p.kept() for p in g.prunable_params() if p.name == row.param)
    assert paths.log_paths > 0


def test_same_seed_same_masks_and_option_checks() -> None:
    def run(seed: int) -> dict[str, np.ndarray]:
        g = load_onnx_model(EXAMPLES / "vgg_small.onnx")
        PassManager(parse_pipeline("npb{sparsity=0.99}")).run(g, AnalysisManager(g, RunContext(seed=seed)))
        return {p.name: p.mask.copy() for p in g.prunable_params() if p.mask is not None}

    a, b = run(1), run(1)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(UsageError):
        parse_pipeline("npb{alpha=1.5}")
    with pytest.raises(Exception, match="allocation"):
        g = load_onnx_model(EXAMPLES / "vgg_small.onnx")
        PassManager(parse_pipeline("npb")).run(g)


def _chain() -> Graph:
    """x[1,2,4,4] -> conv a (2->3, 3x3) -> conv b (3->2, 3x3) -> global pool -> flatten -> fc (2->2)."""
    b = GraphBuilder("chain")
    v = b.conv(b.input((1, 2, 4, 4)), 3, 3, pad=1, weight=b.param("a.weight", (3, 2, 3, 3)))
    v = b.conv(v, 2, 3, pad=1, weight=b.param("b.weight", (2, 3, 3, 3)))
    return b.build(b.linear(b.flatten(b.global_pool(v)), 2, weight=b.param("fc.weight", (2, 2))))


def test_fine_tune_refills_the_most_effective_kernels() -> None:
    g = _chain()
    params = g.prunable_params()
    masks = {p.name: np.zeros(p.shape, dtype=bool) for p in params}
    masks["a.weight"][0, 0, 1, 1] = masks["a.weight"][0, 1, 0, 0] = True  # a: channel 0 <- inputs 0, 1
    masks["a.weight"][2, 0, 2, 2] = masks["a.weight"][2, 1, 0, 0] = True  # a: channel 2, which b never reads
    masks["b.weight"][1, 0, :2, 1] = True  # b: reads channel 0 (2 taps), writes channel 1
    masks["b.weight"][0, 1, 1, 1] = True  # b: reads channel 1, which a never writes: ineffective
    masks["fc.weight"][:, 1] = True
    counter = PathCounter(g, params, {})
    report = fine_tune(counter, masks, {}, {"a.weight": True, "b.weight": True, "fc.weight": False})
    a, b = masks["a.weight"], masks["b.weight"]
    # a: its two ineffective weights are dropped; the budget (2) fills the kernel with the most
    # effective weights, kernel (0, 0) (tie with (0, 1): lower index), completely (overshooting)
    assert not a[2].any() and a[0, 0].all() and a[0, 1].sum() == 1 and a.sum() == 10
    # b: one ineffective weight; budget 1 > 1 is false, so the layer is left as it is
    assert b.sum() == 3 and b[0, 1, 1, 1]
    assert [row["ineffective"] for row in report["layers"]] == [2, 1, None]


def test_linear_program_solved_exactly() -> None:
    """The combinatorial linear-layer solver reaches the integer program's optimum (HiGHS)."""
    rng = np.random.default_rng(0)
    for _ in range(60):
        n_in, n_out = int(rng.integers(1, 9)), int(rng.integers(1, 6))
        p_in = np.maximum(rng.integers(0, 4, n_in), np.arange(n_in) == 0) * rng.choice([1.0, 0.37])  # ties and zeros
        budget, alpha, min_n = int(rng.integers(1, n_in * n_out + 1)), float(rng.choice([0.0, 0.01, 0.5, 1.0])), int(rng.integers(0, 3))
        prob = BlockProblem(np.tile(np.arange(n_in), n_out), np.repeat(np.arange(n_out), n_in), n_in, n_out, p_in, budget, 1, alpha, 0.0, min_n)
        mask = solve_linear(p_in, n_out, budget, alpha, min_n, rng)
        assert mask.shape == (n_out, n_in) and mask.sum() == min(budget, n_in * n_out)
        assert _objective(prob, mask.reshape(-1).astype(float)) == pytest.approx(_objective(prob, solve_block(prob).counts), abs=1e-9)


def test_pointwise_conv_block_solved_exactly_with_beta() -> None:
    """A 1x1 conv block (one tap per kernel) with the kernel regulariser on: the linear closed form
    reaches HiGHS's optimum (beta adds beta/n per kept weight, the same for all)."""
    rng = np.random.default_rng(1)
    for _ in range(40):
        n_in, n_out = int(rng.integers(1, 8)), int(rng.integers(1, 6))
        p_in = np.maximum(rng.integers(0, 4, n_in), np.arange(n_in) == 0) * 0.37
        budget, alpha, beta = int(rng.integers(1, n_in * n_out + 1)), float(rng.choice([0.01, 0.5])), float(rng.choice([1.0, 0.001]))
        prob = BlockProblem(np.tile(np.arange(n_in), n_out), np.repeat(np.arange(n_out), n_in), n_in, n_out, p_in, budget, 1, alpha, beta, 1)
        counts = solve_linear(p_in, n_out, budget, alpha, 1, rng).reshape(-1).astype(float)
        assert _objective(prob, counts) == pytest.approx(_objective(prob, solve_block(prob).counts), abs=1e-9)


def test_chunked_pointwise_conv_takes_the_closed_form() -> None:
    """A 1x1 conv with more kernels than chunk_above is solved block by block in closed form, budgets kept."""
    b = GraphBuilder("pw")
    h = b.relu(b.conv(b.input((1, 8, 4, 4)), 48, 3, pad=1))
    g = b.build(b.conv(h, 40, 1))
    first, pointwise = (p.name for p in g.prunable_params())
    report = PassManager(parse_pipeline("erk{sparsity=0.9},npb{chunk_above=256,chunk=16}")).run(g, AnalysisManager(g, RunContext(seed=0)))[-1].report
    rows = {row["layer"]: row for row in report.layers}
    assert rows[pointwise]["status"] == "exact" and rows[pointwise]["blocks"] == 3
    assert rows[first]["status"] != "exact"
    assert all(row["kept"] <= row["allocated"] + row["blocks"] for row in report.layers)


@pytest.mark.parametrize("sparsity", [0.95, 0.98])
def test_mlp_reads_every_input_and_keeps_weights_effective(sparsity: float) -> None:
    """LeNet-300-100: the layer's program (not identical 10-row blocks) spreads fc1 over the pixels and
    the linear fix-up leaves no ineffective weight (old code: fc1 read 302 of 784 pixels at 95 %,
    60 of 300 hidden units were effective, and 6960 of fc1's 9060 weights led nowhere)."""
    import torch

    from pai_compiler.lab import zoo
    from pai_compiler.frontends.torch.fx import lower_fx

    torch.manual_seed(0)
    g = lower_fx(zoo.build("lenet300"), torch.randn(1, 1, 28, 28))
    records = PassManager(parse_pipeline(f"erk{{sparsity={sparsity}}},npb")).run(g, am := AnalysisManager(g, RunContext(seed=0)))
    fc1 = g.prunable_params()[0].mask
    assert fc1.shape == (300, 784) and fc1.any(axis=0).sum() >= 0.9 * 784
    paths = am.get(NodePathPass())
    kept = sum(p.kept() for p in g.prunable_params())
    assert paths.effective_params == kept and kept >= 0.85 * records[-1].report.allocated
    if sparsity == 0.95:  # the ERK budget covers every input and hidden unit: as many effective nodes as random ERK
        assert paths.effective_nodes == paths.total_nodes == 410 and fc1.any(axis=1).all()


def _groups_of(n_kernels: int, m: int) -> np.ndarray:
    return np.arange(n_kernels) // m


@pytest.mark.parametrize("alpha,beta", [(0.01, 1.0), (0.5, 0.0), (0.9, 0.3)])
def test_nm_block_program_matches_brute_force(alpha: float, beta: float) -> None:
    """2:4 at 2 taps: every group of 4 kernels (one output, 4 inputs) holds exactly 4 kept taps;
    HiGHS's optimum equals the brute-force one over every count vector that does."""
    n_in, n_out, taps, max_p = 4, 2, 2, 2
    kin, kout = np.tile(np.arange(n_in), n_out), np.repeat(np.arange(n_out), n_in)
    group_of = _groups_of(n_in * n_out, 4)
    prob = BlockProblem(kin, kout, n_in, n_out, np.array([3.0, 1.0, 2.0, 2.0]), 2 * taps * n_out, max_p, alpha, beta, 1,
                        group_of=group_of, group_total=2 * taps)
    sol = solve_block(prob)
    assert sol.status == "optimal" and (np.bincount(group_of, weights=sol.counts) == 2 * taps).all()
    feasible = (np.array(c) for c in itertools.product(range(max_p + 1), repeat=n_in * n_out))
    best = max(_objective(prob, c) for c in feasible if (np.bincount(group_of, weights=c) == 2 * taps).all())
    assert _objective(prob, sol.counts) == pytest.approx(best, abs=1e-6)


def test_nm_linear_program_solved_exactly() -> None:
    """N:M linear layers: the per-group closed form reaches HiGHS's optimum with the group equalities,
    and every row keeps exactly N of each group."""
    rng = np.random.default_rng(2)
    for _ in range(40):
        n, m = [(1, 2), (2, 4), (1, 4), (3, 4)][int(rng.integers(0, 4))]
        n_in, n_out = m * int(rng.integers(1, 4)), int(rng.integers(1, 6))
        p_in = np.maximum(rng.integers(0, 4, n_in), np.arange(n_in) == 0) * rng.choice([1.0, 0.37])
        alpha, min_n = float(rng.choice([0.0, 0.01, 0.5, 1.0])), int(rng.integers(0, 3))
        budget = n_out * n_in * n // m
        mask = solve_linear(p_in, n_out, budget, alpha, min_n, rng, (n, m))
        assert mask.shape == (n_out, n_in) and (mask.reshape(n_out, -1, m).sum(axis=2) == n).all()
        prob = BlockProblem(np.tile(np.arange(n_in), n_out), np.repeat(np.arange(n_out), n_in), n_in, n_out, p_in, budget, 1, alpha, 0.0, min_n,
                            group_of=_groups_of(n_in * n_out, m), group_total=n)
        assert _objective(prob, mask.reshape(-1).astype(float)) == pytest.approx(_objective(prob, solve_block(prob).counts), abs=1e-9)


def test_nm_taps_are_dealt_n_per_tap() -> None:
    """A group's kept taps land N at every tap position, each kernel's count on distinct taps."""
    from pai_compiler.passes.criteria.npb.criterion import _dealt_taps

    rng = np.random.default_rng(0)
    taps, m, n = 9, 4, 2
    counts = np.array([[9, 9, 0, 0], [5, 4, 5, 4], [3, 6, 2, 7]]).reshape(-1)  # each group: n * taps = 18
    mask = _dealt_taps(counts, taps, m, rng)
    assert (mask.sum(axis=1) == counts).all()
    assert (mask.reshape(-1, m, taps).sum(axis=1) == n).all()


def test_weights_dropped_by_the_fix_up_are_reported() -> None:
    """Depthwise blocks at 90 %: the fix-up drops weights on no input->output path (the reference's
    rule), so fewer than allocated are kept; the run says so instead of silently missing --sparsity."""
    import torch
    from torch import nn

    from pai_compiler.api import optimize
    from pai_compiler.frontends.torch.spec import lower_module

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in), nn.ReLU(), nn.Conv2d(c_in, c_out, 1), nn.ReLU()]

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), *block(16, 32), *block(32, 64), *block(64, 64),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    result = optimize(lower_module(module, torch.randn(1, 3, 8, 8)), sparsity=0.9, method="npb")
    report = result.records[-1].report
    assert isinstance(report, NpbReport) and report.kept < 0.99 * report.allocated
    kept = sum(int(p.mask_or_ones().sum()) for p in result.graph.prunable_params())
    assert [w for w in result.warnings if w.startswith(f"npb kept {kept:,} of the {report.allocated:,} allocated")]
    assert not [w for w in optimize(load_onnx_model(EXAMPLES / "vgg_small.onnx"), sparsity=0.9, method="npb").warnings if w.startswith("npb kept")]
