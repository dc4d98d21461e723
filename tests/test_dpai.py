"""DPaI pass: exact budgets, determinism, channel vs per-pixel connectivity, movement, update rule, ties."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pai_compiler.errors import UsageError
from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.ir import Graph, GraphBuilder
from pai_compiler.pass_infra import AnalysisManager, PassManager, RunContext
from pai_compiler.passes.analysis.node_path import NodePathPass
from pai_compiler.passes.criteria.dpai.loop import Adam, PixelStep
from pai_compiler.passes.analysis.bindings import sample_bindings
from pai_compiler.passes.criteria.dpai.outcome import DpaiReport
from pai_compiler.passes.criteria.dpai.pixel_paths import PixelObjective
from pai_compiler.passes.criteria.dpai.driver import build, initial_scores
from pai_compiler.passes.criteria.dpai.select import IncrementalTopK, adam_step_bound, reference_topk
from pai_compiler.passes.criteria.dpai.step import combine
from pai_compiler.pipeline import parse_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
RESNET20_KEEP_99 = [42] + [63] * 6 + [89, 115, 83] + [115] * 4 + [168, 220, 161] + [220] * 4 + [122]


def _model(name: str) -> Graph:
    return load_onnx_model(EXAMPLES / f"{name}.onnx")


def _run(graph: Graph, pipeline: str, seed: int = 0) -> Graph:
    _run_dpai(graph, pipeline, seed)
    return graph


def _run_dpai(graph: Graph, pipeline: str, seed: int = 0) -> DpaiReport:
    """Run ``pipeline`` on ``graph``; the report of its last pass, a dpai."""
    records = PassManager(parse_pipeline(pipeline)).run(graph, AnalysisManager(graph, RunContext(seed=seed)))
    report = records[-1].report
    assert isinstance(report, DpaiReport)
    return report


def _masks(graph: Graph) -> dict[str, np.ndarray]:
    return {p.name: p.mask_or_ones().copy() for p in graph.prunable_params()}


def _setup(graph: Graph, sparsity: float, paths: str = "channel", seed: int = 0, ties: str = "auto") -> tuple[Any, ...]:
    allocation = PassManager(parse_pipeline(f"erk{{sparsity={sparsity}}}")).run(graph)[0].report
    layout, topk, update, step = build(graph, graph.prunable_params(), dict(allocation.keep), paths, 0.99, 0.5, "cpu", sample_bindings(graph), ties)
    return layout, topk, update, step, initial_scores(layout, seed, "cpu")


# ---- budgets, determinism, options ------------------------------------------------------------
def test_keep_counts_are_exact_per_layer() -> None:
    g = _model("resnet20")
    report = _run_dpai(g, "erk{sparsity=0.99},dpai{steps=40}")
    assert [p.kept() for p in g.prunable_params()] == RESNET20_KEEP_99
    assert report.kept == 2718 and report.steps == 40 and len(report.trajectory) == 2
    # dpai{sparsity=...} means ERK without a separate allocation pass
    g2 = _run(_model("resnet20"), "dpai{steps=0,sparsity=0.99}")
    assert [p.kept() for p in g2.prunable_params()] == RESNET20_KEEP_99


def test_needs_an_allocation_and_checks_options() -> None:
    with pytest.raises(Exception, match="allocation"):
        _run(_model("vgg_small"), "dpai{steps=1}")
    for bad in ("dpai{paths=pixel}", "dpai{steps=-1}", "dpai{alpha=2}", "dpai{ties=random}", "dpai{state=low}", "dpai{state=band,paths=ref}", "dpai{state=band,ties=sort}"):
        with pytest.raises(UsageError):
            parse_pipeline(bad)


@pytest.mark.parametrize("paths", ["channel", "ref"])
def test_same_seed_same_masks(paths: str) -> None:
    spec = f"erk{{sparsity=0.99}},dpai{{steps=25,paths={paths}}}"
    first, second = _masks(_run(_model("resnet20"), spec, seed=3)), _masks(_run(_model("resnet20"), spec, seed=3))
    other = _masks(_run(_model("resnet20"), spec, seed=4))
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert not all(np.array_equal(first[k], other[k]) for k in first)


# ---- channel-level connectivity equals the per-pixel one -----------------------------------------
@pytest.mark.parametrize("name,sparsity", [("resnet20", 0.9), ("resnet20", 0.99), ("resnet20", 0.9968), ("vgg_small", 0.9), ("tiny_vit", 0.9)])
def test_channel_connectivity_equals_per_pixel(name: str, sparsity: float) -> None:
    g = _model(name)
    layout, topk, update, step, scores = _setup(g, sparsity, seed=3)
    kept = update.kept(topk.select(scores))
    chan = step(scores, kept, None).read()
    pixel = PixelStep(PixelObjective(g, layout, "ref", "cpu", sample_bindings(g)), update)(torch.ones(layout.numel), kept, None).read()
    assert (chan["nodes"], chan["kernels"], chan["params"]) == (pixel["nodes"], pixel["kernels"], pixel["params"])
    if sparsity < 0.99:  # no dead ends: DPaI's convention equals the exact, boolean one
        masks = layout.masks(kept.index.numpy())
        for p in g.prunable_params():
            g.set_mask(p, masks[p.name])
        res = NodePathPass().run(g, AnalysisManager(g))
        exact = tuple(sum(getattr(r, f) for r in res.layers) for f in ("effective_nodes", "effective_kernels", "effective_params"))
        assert exact == (chan["nodes"], chan["kernels"], chan["params"])


def test_dead_taps_count_zero_in_channel_mode() -> None:
    """3x3 convs on 2x2 and 1x1 maps: taps that never read a pixel are dead, as per pixel."""
    b = GraphBuilder("tiny")
    x0 = b.input((1, 2, 2, 2))
    x = b.conv(x0, 4, 3, stride=2, pad=1)  # 2x2 -> 1x1: only taps (1..2, 1..2) read data
    x = b.conv(x, 3, 3, pad=1)  # 1x1 -> 1x1: only the centre tap
    g = b.build(b.linear(b.flatten(x), 2))
    layout, topk, update, step, scores = _setup(g, 0.5, seed=1)
    assert sorted(layout.tap_live) == ["conv1.weight", "conv2.weight"]
    kept = update.kept(topk.select(scores))
    chan = step(scores, kept, None).read()
    pixel = PixelStep(PixelObjective(g, layout, "exact", "cpu", sample_bindings(g)), update)(torch.ones(layout.numel), kept, None).read()
    assert (chan["nodes"], chan["kernels"], chan["params"]) == (pixel["nodes"], pixel["kernels"], pixel["params"])


@pytest.mark.parametrize("name", ["resnet20", "tiny_vit"])
def test_torch_backend_of_the_channel_tape_matches_numpy(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tape runs in torch on non-CPU devices: check that path here, against the numpy one."""
    import pai_compiler.passes.criteria.dpai.channel_program as channel
    from pai_compiler.passes.criteria.dpai.ops import TorchOps
    from pai_compiler.passes.criteria.dpai.pixel_paths import value_shapes

    g = _model(name)
    layout, topk, update, step, scores = _setup(g, 0.95, seed=2)
    kept = update.kept(topk.select(scores))
    monkeypatch.setattr(channel, "make_ops", lambda device: TorchOps(device))
    other = channel.ChannelProgram(g, layout, value_shapes(g, sample_bindings(g), "cpu"), "cpu", sample_bindings(g))
    for program in (step.program, other):
        program.counts.zero_()
        program.counts.index_add_(0, kept.kernel, update.ones)
    log_np, log_t = step.program.forward_backward(), other.forward_backward()
    assert other.ops.name == "torch" and float(log_t) == pytest.approx(float(log_np), rel=1e-5)
    torch.testing.assert_close(other.grad, step.program.grad, rtol=1e-4, atol=1e-9)


# ---- the optimisation moves the mask and raises the path count ----------------------------------
@pytest.mark.parametrize("name", ["resnet20", "vgg_small", "tiny_vit"])
def test_few_steps_move_mask_and_raise_log_paths(name: str) -> None:
    before = _masks(_run(_model(name), "erk{sparsity=0.95},dpai{steps=0}"))
    g = _model(name)
    report = _run_dpai(g, "erk{sparsity=0.95},dpai{steps=30,lr=0.05}")
    after = _masks(g)
    assert sum(int((before[k] != after[k]).sum()) for k in before) > 0
    assert report.final["log_paths"] > report.initial["log_paths"]
    assert report.objective["final"]["log_paths"] > report.objective["initial"]["log_paths"]


def test_update_sign_grows_scores_with_positive_path_gradient() -> None:
    """One Adam step: |S| grows by lr where dlogP/dM > 0, shrinks where < 0, stays where 0."""
    g = _model("resnet20")
    layout, topk, update, step, scores = _setup(g, 0.99, paths="ref")
    kept = update.kept(topk.select(scores))
    objective = PixelObjective(g, layout, "ref", "cpu", sample_bindings(g))
    objective.set_mask(kept.index)
    _, dmask = objective.log_paths()
    assert dmask is not None
    before = scores.detach().abs().clone()
    scores.grad = torch.zeros_like(scores)
    step(scores, kept, scores.grad)
    Adam(scores, 0.01).step()
    change = (scores.detach().abs() - before).numpy()
    d, away = dmask.numpy(), before.numpy() > 0.02  # not crossing zero in one step
    assert (d > 0).any() and (d == 0).any()
    assert np.all(np.sign(change[away & (d != 0)]) == np.sign(d[away & (d != 0)])) and np.all(change[d == 0] == 0)
    assert np.all(np.abs(change) <= 0.01 + 1e-6)
    assert np.allclose(change[away & (np.abs(d) > 1e-3)], 0.01 * np.sign(d[away & (np.abs(d) > 1e-3)]), rtol=5e-3)  # eps = 1e-8 vs |grad| >= 1e-5


# ---- the surrogate on a hand-built graph, against an independent computation ------------------
def test_surrogate_matches_an_independent_computation() -> None:
    b = GraphBuilder("tiny")
    x0 = b.input((1, 2, 5, 5))
    a = b.conv(x0, 3, 3, pad=1)
    c = b.conv(b.relu(a), 3, 3, pad=1)
    g = b.build(b.linear(b.flatten(b.global_pool(b.add(a, c))), 2))
    layout, topk, update, step, scores = _setup(g, 0.6, seed=5)
    kept = update.kept(topk.select(scores))
    masks = {p: torch.as_tensor(m, dtype=torch.float32) for p, m in layout.masks(kept.index.numpy()).items()}
    s_nat = {layer.name: layout.natural(scores.detach(), layer) for layer in layout.layers}
    names = [layer.name for layer in layout.layers]

    def expected(log_p_of: Any) -> np.ndarray:
        leaves = {n: masks[n].clone().requires_grad_(True) for n in names}
        grads = torch.autograd.grad(log_p_of(leaves), [leaves[n] for n in names])
        out = []
        for n, dm in zip(names, grads):
            g_ = torch.sign(s_nat[n]) * dm
            eff = (g_.abs() * masks[n]) > 0
            kern = eff.reshape(eff.shape[0], eff.shape[1], -1).any(-1) if eff.dim() > 2 else eff
            node = eff.reshape(eff.shape[0], -1).any(1)
            shape = (-1,) + (1,) * (g_.dim() - 1)
            kb = kern.reshape(kern.shape + (1,) * (g_.dim() - kern.dim())).float()
            out.append(combine(g_, 1 - node.float().reshape(shape), 1 - kb, 0.99, 0.5).reshape(-1))
        return torch.cat(out).numpy()

    def channel_log_p(w: dict[str, torch.Tensor]) -> torch.Tensor:  # interior values, W = kept taps
        k1, k2, k3 = names
        x, logs = torch.ones(2), []

        def lin(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            mx = v.max()
            logs.append(mx.log())
            return m.reshape(m.shape[0], m.shape[1], -1).sum(-1) @ (v / mx)

        y1 = lin(x, w[k1])
        s = y1 + lin(y1, w[k2])
        return torch.log(lin(s, w[k3]).sum()) + sum(logs)

    def pixel_log_p(w: dict[str, torch.Tensor]) -> torch.Tensor:  # the reference's per-pixel R_P
        k1, k2, k3 = names
        x, logs = torch.ones(1, 2, 5, 5), []

        def norm(v: torch.Tensor) -> torch.Tensor:
            mx = v.max()
            logs.append(mx.log())
            return v / mx

        y1 = torch.nn.functional.conv2d(norm(x), w[k1], padding=1)
        s = y1 + torch.nn.functional.conv2d(norm(y1), w[k2], padding=1)
        return torch.log((norm(s.mean((2, 3))) @ w[k3].t()).sum()) + sum(logs)

    for log_p_of, fn in ((channel_log_p, step), (pixel_log_p, PixelStep(PixelObjective(g, layout, "ref", "cpu", sample_bindings(g)), update))):
        grad = torch.zeros_like(scores.detach())
        fn(scores, kept, grad)  # every weight here is (out, in, taps) already: flat order = natural order
        np.testing.assert_allclose(grad.numpy(), expected(log_p_of), rtol=2e-5, atol=1e-7)


# ---- top-k: exact incremental selection, sort tie-breaking ---------------------------------------
def test_ties_are_broken_like_the_reference_sort() -> None:
    rng = np.random.default_rng(0)
    b = GraphBuilder("tiny")
    x0 = b.input((1, 16, 4, 4))
    g = b.build(b.flatten(b.global_pool(b.conv(x0, 32, 3, pad=1))))
    layout, topk, update, step, _ = _setup(g, 0.7, ties="sort")
    values = rng.choice([0.5, 1.0, 1.5, 2.0], size=layout.numel).astype(np.float32)  # many exact ties
    scores = torch.as_tensor(values * rng.choice([-1, 1], size=layout.numel).astype(np.float32))
    keep = layout.layers[0].keep
    picked = topk.select(scores)
    assert topk.tie_events == 1
    assert np.array_equal(np.sort(picked.numpy()), np.sort(reference_topk(scores.abs(), keep).numpy()))
    assert not np.array_equal(np.sort(picked.numpy()), np.sort(np.argsort(-values, kind="stable")[:keep]))  # not a stable rule
    lowest = IncrementalTopK(layout, "cpu", ties="index").select(scores).numpy()
    kth = np.sort(values)[::-1][keep - 1]
    expect = np.concatenate([np.flatnonzero(values > kth), np.flatnonzero(values == kth)[: keep - int((values > kth).sum())]])
    assert np.array_equal(np.sort(lowest), np.sort(expect))


@pytest.mark.parametrize("ties", ["sort", "index"])
def test_incremental_topk_equals_a_full_sort_every_step(ties: str) -> None:
    g = _model("resnet20")
    layout, topk, update, step, scores = _setup(g, 0.99, seed=1, ties=ties)
    opt = Adam(scores, 0.005)
    scores.grad = torch.zeros_like(scores)
    for t in range(100):
        picked = topk.select(scores)
        a = scores.detach().abs()
        parts = []
        for layer in layout.layers:
            seg = a[layer.offset : layer.offset + layer.numel]
            if ties == "sort":
                parts.append(reference_topk(seg, layer.keep) + layer.offset)
            else:
                kth = torch.topk(seg, layer.keep).values[-1]
                above, at = torch.nonzero(seg > kth).squeeze(1), torch.nonzero(seg == kth).squeeze(1)
                parts.append(torch.cat([above, at[: layer.keep - above.numel()]]) + layer.offset)
        assert torch.equal(torch.sort(picked).values, torch.sort(torch.cat(parts)).values), f"step {t}"
        step(scores, update.kept(picked), scores.grad)
        opt.step()
        topk.moved(0.005 * adam_step_bound(t + 1) * (1 + 1e-3) + 1e-6)
    assert topk.rebuilds >= 2  # the pool was refreshed along the way (ties: see the test above)


def test_adam_bound_holds_and_fused_adam_matches_torch() -> None:
    rng = torch.Generator().manual_seed(0)
    a = torch.randn(500, generator=rng).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    mine, ref = Adam(a, 0.01), torch.optim.Adam([b], lr=0.01)
    for t in range(1, 60):
        grad = torch.randn(500, generator=rng) * (100.0 if t % 17 == 0 else 1e-3)
        before = a.detach().clone()
        a.grad, b.grad = grad.clone(), grad.clone()
        mine.step()
        ref.step()
        assert float((a.detach() - before).abs().max()) <= 0.01 * adam_step_bound(t) * (1 + 1e-5)
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


# ---- band state: only the scores that can cross a boundary, same masks as the full state ---------
def _report_core(report: DpaiReport) -> dict[str, Any]:
    drop = ("seconds", "ms_per_step", "setup_seconds", "topk", "state", "tracked")
    return {k: v for k, v in report.as_dict().items() if k not in drop}


@pytest.mark.parametrize("name,sparsity,steps", [("resnet20", 0.99, 60), ("resnet20", 0.9, 10), ("vgg_small", 0.5, 10), ("tiny_vit", 0.9, 25)])
def test_band_state_equals_full_state(name: str, sparsity: float, steps: int) -> None:
    full, band = _model(name), _model(name)
    full_report, band_report = (_run_dpai(g, f"erk{{sparsity={sparsity}}},dpai{{steps={steps},state={state}}}", seed=2)
                                for g, state in ((full, "weights"), (band, "band")))
    assert full_report.state == "weights" and band_report.state == "band"
    assert band_report.tracked < full_report.tracked
    first, second = _masks(full), _masks(band)
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert _report_core(full_report) == _report_core(band_report)


def test_band_state_on_dead_taps_and_whole_layers() -> None:
    b = GraphBuilder("tiny")
    x0 = b.input((1, 2, 2, 2))
    x = b.conv(x0, 4, 3, stride=2, pad=1)
    x = b.conv(x, 3, 3, pad=1)
    g = b.build(b.linear(b.flatten(x), 2))
    full, band = g.clone(), g.clone()
    full_report, band_report = (_run_dpai(graph, f"dpai{{steps=15,lr=0.05,sparsity=0.5,state={state}}}") for graph, state in ((full, "weights"), (band, "band")))
    assert band_report.dead_taps == ["conv1.weight", "conv2.weight"]
    assert all(np.array_equal(a, c) for a, c in zip(_masks(full).values(), _masks(band).values()))
    assert _report_core(full_report) == _report_core(band_report)


def test_band_holds_the_boundary_and_auto_picks_it_for_short_runs() -> None:
    from pai_compiler.passes.criteria.dpai.band import BandState, band_fraction, drift_bound
    from pai_compiler.passes.criteria.dpai.driver import choose_state

    g = _model("vgg_small")
    layout, *_ = _setup(g, 0.9)
    drift = drift_bound(10, 0.005)
    state = BandState(layout, 0, drift, "cpu")
    scores = initial_scores(layout, 0, "cpu").detach().abs()
    for layer, band in zip(layout.layers, state.bands):
        a = scores[layer.offset : layer.offset + layer.numel]
        assert torch.equal(state.scores.detach()[band.span.offset : band.span.offset + band.span.numel].abs(), a[band.local])
        if band.always is not None and band.always.numel() and band.local.numel():
            t0 = float(torch.topk(a, layer.keep).values[-1])  # k-th largest |S0|
            outside = torch.ones(layer.numel, dtype=torch.bool)
            outside[band.local] = False
            outside[band.always.long()] = False
            assert bool((a[band.always.long()] > t0 + 2 * drift).all()) and bool((a[outside] < t0 - 2 * drift).all())
            assert band.span.keep == layer.keep - band.always.numel() > 0
    sizes = [(layer.numel, layer.keep) for layer in layout.layers]
    assert state.numel / layout.numel == pytest.approx(band_fraction(sizes, 10, 0.005), abs=0.02)
    assert choose_state("auto", "channel", "auto", sizes, 10, 0.005) == "band"
    assert choose_state("auto", "channel", "auto", sizes, 3000, 0.005) == "full"
    assert choose_state("auto", "ref", "auto", sizes, 10, 0.005) == "full"


def test_memory_check_refuses_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import pai_compiler.passes.criteria.dpai.driver as run
    from pai_compiler.errors import PaicError

    g = _model("resnet20")
    need, state = run.memory_estimate(g.prunable_params(), {p.name: p.numel // 10 for p in g.prunable_params()}, parse_pipeline("dpai{steps=10}")[0])
    assert state == "band" and need < run.FULL_BYTES * sum(p.numel for p in g.prunable_params())
    monkeypatch.setattr(run, "memory_estimate", lambda *a: (1 << 60, "full"))
    with pytest.raises(PaicError, match=r"need about .* GiB on the CPU \(full state, 10 steps\), only .* GiB is available"):
        _run(g, "erk{sparsity=0.9},dpai{steps=10}")

