"""SynFlow's flat-buffer rounds and sort-free top-k reproduce the previous per-layer computation bit for bit.

``previous_synflow_masks`` is the loop as it was before the speed-up (3a58ae2..c9cb0f1): one
tensor per layer, ``w * mask.to(dtype)``, ``(g * w).abs()``, a stacked max, and a
``kthvalue`` top-k over ``torch.cat`` of the scores. The pass must give the same masks on
the example models, on a model whose layers are constant (ties everywhere, as the ONNX
light models' ConstantOfShape weights) and in both precisions, scopes and schedules; the
sampled top-k must equal ``topk_mask_torch`` on arrays big enough to take the sampled path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.interp import Interpreter, is_float_array, param_tensor, torch_ready
from pai_compiler.ir import Graph
from pai_compiler.pass_infra import AnalysisManager, PassManager, RunContext
from pai_compiler.passes.analysis.bindings import sample_bindings
from pai_compiler.passes.analysis.paths import ones_inputs
from pai_compiler.passes.criteria.base import apply_scores, resolve_keep
from pai_compiler.passes.criteria.synflow import SynflowPass, schedule_keep
from pai_compiler.passes.criteria.synflow_net import is_additive_mask
from pai_compiler.passes.criteria.synflow_select import SAMPLED_ABOVE, topk_mask_into, topk_mask_torch

torch.set_num_threads(1)


# ---- the previous computation, kept as the reference ---------------------------------------
def _previous_scores(interp: Interpreter, ones: list[torch.Tensor], magnitudes: dict[str, torch.Tensor],
                     masks: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    leaves = {n: (w * masks[n].to(dtype)).requires_grad_(True) for n, w in magnitudes.items()}
    interp.weights = leaves
    total = sum(o.sum() for o in interp.run(ones).outputs if o.is_floating_point())
    assert isinstance(total, torch.Tensor) and total.requires_grad and torch.isfinite(total)
    total.backward()
    scores = {n: (leaf.grad * leaf.detach()).abs() if leaf.grad is not None else torch.zeros_like(leaf) for n, leaf in leaves.items()}
    top = torch.stack([s.max() for s in scores.values() if s.numel()]).max()
    top = torch.where(top > 0, top, torch.ones_like(top))
    return {n: s / top for n, s in scores.items()}


def previous_synflow_masks(graph: Graph, spec: SynflowPass) -> dict[str, np.ndarray]:
    """The masks the pre-speed-up SynFlow loop set on ``graph`` (which it leaves untouched)."""
    graph = graph.clone()
    am = AnalysisManager(graph, RunContext())
    params = graph.prunable_params()
    keep = resolve_keep(am, params, spec.sparsity, spec.scope, "synflow")
    dtype = {"float32": torch.float32, "float64": torch.float64}[spec.precision]
    net = graph.clone()
    for p in net.params():
        if is_float_array(p.data) and not is_additive_mask(p):
            net.set_param_data(p, np.abs(torch_ready(p.data)))
    by_name = {p.name: p for p in net.params()}
    magnitudes = {p.name: param_tensor(by_name[p.name], dtype, "cpu") for p in params}
    bind = sample_bindings(net, None)
    interp = Interpreter(net, mode="real", dtype=dtype, bind=bind, lookup="ones")
    ones = ones_inputs(net, bind, dtype, "cpu")
    masks = {p.name: torch.as_tensor(p.mask_or_ones()) for p in params}
    sizes = [p.numel for p in params]
    density = 1.0 - float(spec.sparsity)
    for e in range(spec.iterations):
        scores = _previous_scores(interp, ones, magnitudes, masks, dtype)
        if e == spec.iterations - 1:
            break
        if isinstance(keep, dict):
            for p in params:
                k = schedule_keep(p.numel, keep[p.name], density, e, spec.iterations, spec.schedule)
                masks[p.name] = topk_mask_torch(scores[p.name].reshape(-1), k).reshape(p.shape)
        else:
            k = schedule_keep(sum(sizes), keep, density, e, spec.iterations, spec.schedule)
            flat = topk_mask_torch(torch.cat([scores[p.name].reshape(-1) for p in params]), k)
            for p, part in zip(params, torch.split(flat, sizes)):
                masks[p.name] = part.reshape(p.shape)
    apply_scores(graph, params, {n: s.detach().double().numpy() for n, s in scores.items()}, keep)
    return {p.name: p.mask.copy() for p in graph.prunable_params()}


def _pass_masks(graph: Graph, spec: SynflowPass) -> dict[str, np.ndarray]:
    graph = graph.clone()
    PassManager([spec]).run(graph, AnalysisManager(graph, RunContext()))
    return {p.name: p.mask.copy() for p in graph.prunable_params()}


def _constant_layers(graph: Graph) -> Graph:
    """Every prunable layer filled with one value (ConstantOfShape-style weights): ties everywhere."""
    graph = graph.clone()
    for index, p in enumerate(graph.prunable_params()):
        graph.set_param_data(p, np.full(p.shape, 0.01 * (1 + index % 3), dtype=np.float32))
    return graph


def _assert_same_masks(graph: Graph, spec: SynflowPass) -> None:
    new, old = _pass_masks(graph, spec), previous_synflow_masks(graph, spec)
    assert new.keys() == old.keys()
    for name in old:
        assert np.array_equal(new[name], old[name]), f"{spec}: mask of {name} differs from the previous computation"


# ---- the pass against the previous computation ----------------------------------------------
@pytest.mark.parametrize(("model", "options"), [
    ("resnet20.onnx", dict(sparsity=0.95, iterations=4)),
    ("resnet20.onnx", dict(sparsity=0.9, iterations=3, scope="layer", schedule="linear")),
    ("vgg_small.onnx", dict(sparsity=0.98, iterations=5, precision="float32")),
    ("tiny_vit.onnx", dict(sparsity=0.9, iterations=4)),
])
def test_pass_matches_previous_computation(examples_dir: Path, model: str, options: dict[str, object]) -> None:
    _assert_same_masks(load_onnx_model(examples_dir / model), SynflowPass(**options))  # type: ignore[arg-type]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_constant_layers_break_ties_like_previous_computation(examples_dir: Path, scope: str) -> None:
    """One value per layer: every round's threshold falls inside a tie of thousands of weights."""
    graph = _constant_layers(load_onnx_model(examples_dir / "resnet20.onnx"))
    _assert_same_masks(graph, SynflowPass(sparsity=0.9, iterations=4, scope=scope))  # type: ignore[arg-type]


# ---- the sampled top-k against the rule ------------------------------------------------------
def _arrays(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    uniform = rng.random(n)
    with_nan = uniform.copy()
    with_nan[rng.random(n) < 0.2] = np.nan
    with_inf = np.where(rng.random(n) < 0.5, 1.0, uniform)
    with_inf[:3] = np.inf
    return {
        "uniform": uniform,
        "few values": rng.integers(0, 5, n).astype(np.float64),
        "mostly zero": np.where(rng.random(n) < 0.8, 0.0, uniform),
        "nan": with_nan,
        "inf and ties": with_inf,
        "float32": uniform.astype(np.float32),
        "skewed": np.exp(40 * rng.standard_normal(n)),
    }


@pytest.mark.parametrize("n", [1000, SAMPLED_ABOVE + 1, 2 * SAMPLED_ABOVE + 3])
def test_topk_mask_into_equals_rule(n: int) -> None:
    rng = np.random.default_rng(n)
    for label, values in _arrays(rng, n).items():
        scores = torch.as_tensor(values)
        positive = int(np.count_nonzero(values > 0))  # the edge of a zero mass: the pruned weights' scores
        edges = {min(n, max(0, positive + d)) for d in (-3, 0, 3)}
        for k in sorted({0, 1, 7, n // 100, n // 3, n // 2, n - 5, n - 1, n, int(rng.integers(1, n)), *edges}):
            out = torch.ones(n, dtype=torch.bool)  # stale contents must not leak into the mask
            topk_mask_into(scores, k, out, np.ones(n, dtype=bool))
            assert torch.equal(out, topk_mask_torch(scores, k)), f"{label}: n={n} k={k}"


def test_topk_mask_into_writes_a_slice_in_place() -> None:
    rng = np.random.default_rng(3)
    n = SAMPLED_ABOVE + 200_000
    scores = torch.as_tensor(np.round(rng.random(n), 3))
    masks = torch.zeros(n, dtype=torch.bool)
    topk_mask_into(scores[100_000:], 123_456, masks[100_000:])
    assert not masks[:100_000].any()
    assert torch.equal(masks[100_000:], topk_mask_torch(scores[100_000:], 123_456))
    assert int(masks.sum()) == 123_456
