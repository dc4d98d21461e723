"""ERK and uniform allocation; exact keep counts; criteria scopes and ties."""
from __future__ import annotations

import numpy as np
import pytest

from pai_compiler.api import optimize
from pai_compiler.errors import PassError, UsageError
from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.pass_infra import AnalysisManager, PassManager
from pai_compiler.passes.allocation.base import Allocation
from pai_compiler.passes.allocation.erk import erk_densities
from pai_compiler.passes.criteria.base import topk_mask
from pai_compiler.pipeline import parse_pipeline

# algorithms.md §1.4 (DPaI reference output), ResNet-20 in module order
RESNET20_ERK = {
    0.90: [0.9830] + [0.2802] * 6 + [0.1991, 0.1290, 1.0000] + [0.1290] * 4 + [0.0940, 0.0617, 0.8128] + [0.0617] * 4 + [1.0000],
    0.99: [0.0950] + [0.0271] * 6 + [0.0192, 0.0125, 0.1602] + [0.0125] * 4 + [0.0091, 0.0060, 0.0785] + [0.0060] * 4 + [0.1897],
}


@pytest.fixture(scope="module")
def resnet20(examples_dir):  # type: ignore[no-untyped-def]
    return load_onnx_model(examples_dir / "resnet20.onnx")


@pytest.mark.parametrize("sparsity", [0.90, 0.99])
def test_erk_matches_reference_table(resnet20, sparsity: float) -> None:  # type: ignore[no-untyped-def]
    params = resnet20.prunable_params()
    dens = erk_densities(params, 1 - sparsity)
    got = [dens[p.name] for p in params]
    assert len(got) == 22
    assert np.allclose(got, RESNET20_ERK[sparsity], atol=1e-4)


def test_erk_keep_counts_match_reference_at_99(resnet20) -> None:  # type: ignore[no-untyped-def]
    g = resnet20.clone()
    PassManager(parse_pipeline("erk{sparsity=0.99},random")).run(g)
    kept = [p.kept() for p in g.prunable_params()]
    assert kept == [42] + [63] * 6 + [89, 115, 83] + [115] * 4 + [168, 220, 161] + [220] * 4 + [122]
    assert sum(kept) == 2718


def test_allocation_is_a_typed_result_not_graph_state(resnet20) -> None:  # type: ignore[no-untyped-def]
    g = resnet20.clone()
    am = AnalysisManager(g)
    version = g.version
    records = PassManager(parse_pipeline("uniform{sparsity=0.5}")).run(g, am)
    allocation = am.provided(Allocation)
    assert allocation is records[0].report and allocation.source == "uniform{sparsity=0.5}"
    assert dict(allocation.keep) == {p.name: p.numel - p.numel // 2 for p in g.prunable_params()}
    assert g.version == version and "allocation" not in g.meta and not records[0].modified
    with pytest.raises(TypeError):
        allocation.keep["x"] = 1  # type: ignore[index]
    PassManager(parse_pipeline("erk{sparsity=0.9}")).run(g, am)  # a later allocation replaces the earlier one
    assert am.provided(Allocation).source == "erk{sparsity=0.9}"  # type: ignore[union-attr]
    assert AnalysisManager(g).provided(Allocation) is None


def test_uniform_and_global_budgets(resnet20) -> None:  # type: ignore[no-untyped-def]
    g = resnet20.clone()
    PassManager(parse_pipeline("uniform{sparsity=0.9},magnitude{scope=layer}")).run(g)
    for p in g.prunable_params():
        assert p.kept() == p.numel - int(np.floor(0.9 * p.numel))
    g = resnet20.clone()
    PassManager(parse_pipeline("magnitude{sparsity=0.9}")).run(g)
    total = sum(p.numel for p in g.prunable_params())
    assert sum(p.kept() for p in g.prunable_params()) == total - int(np.floor(0.9 * total))
    # global magnitude keeps exactly the largest |w| over all layers
    allw = np.concatenate([np.abs(p.data).ravel() for p in g.prunable_params()])
    kept = np.concatenate([np.abs(p.data)[p.mask] for p in g.prunable_params()])
    assert kept.min() >= np.sort(allw)[-len(kept)]


def test_scope_layer_without_allocation_is_a_clear_error(resnet20) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PassError, match="needs an allocation pass"):
        PassManager(parse_pipeline("magnitude{scope=layer}")).run(resnet20.clone())


def test_topk_ties_go_to_lower_index() -> None:
    scores = np.array([1.0, 2.0, 2.0, 2.0, 0.5])
    assert np.array_equal(np.flatnonzero(topk_mask(scores, 2)), [1, 2])
    assert topk_mask(scores, 0).sum() == 0 and topk_mask(scores, 9).all()


def test_random_is_deterministic_and_seeded(resnet20) -> None:  # type: ignore[no-untyped-def]
    masks = []
    for seed in (0, 0, 1):
        r = optimize(resnet20.clone(), sparsity=0.95, method="random", seed=seed)
        masks.append(np.concatenate([m.ravel() for m in r.masks.values()]))
    assert np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[0], masks[2])


def test_empty_layer_warning(resnet20) -> None:  # type: ignore[no-untyped-def]
    g = resnet20.clone()
    am = AnalysisManager(g)
    PassManager(parse_pipeline("random{scope=global,sparsity=0.9999}")).run(g, am)
    empty = [p.name for p in g.prunable_params() if p.kept() == 0]
    assert empty, "a global budget of 28 weights must empty some layer"
    assert any("keep no weight" in w and empty[0] in w for w in am.warnings) and g.meta["warnings"] == []
    result = optimize(resnet20.clone(), pipeline="random{scope=global,sparsity=0.9999}")
    assert result.warnings == am.warnings


def test_sparsity_flag_validation() -> None:
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(UsageError):
            parse_pipeline(f"erk{{sparsity={bad}}}")
