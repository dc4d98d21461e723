"""Identical token rows counted once (``token_rows``) give the full products' counts and gradients."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pai_compiler.passes.criteria.dpai.token_rows import group_gradient_into, row_groups, rows_times


def _rows(seed: int, pattern: list[int], width: int = 24) -> np.ndarray:
    distinct = np.random.default_rng(seed).random((max(pattern) + 1, width), dtype=np.float32)
    return distinct[pattern]


@pytest.mark.parametrize("pattern", [[0, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 1, 1, 2], [0, 0, 0, 0]])
def test_grouped_products_equal_the_full_ones(pattern: list[int]) -> None:
    x = _rows(0, pattern)
    w = np.random.default_rng(1).random((9, x.shape[1]), dtype=np.float32)
    gy = np.random.default_rng(2).random((x.shape[0], 9), dtype=np.float32)
    groups = row_groups(x)
    assert groups is not None and groups.unique.shape[0] == len(set(pattern))
    np.testing.assert_array_equal(groups.unique[groups.inverse], x)
    np.testing.assert_allclose(rows_times(x, w.T), x @ w.T, rtol=1e-6)
    gw = group_gradient_into(np.full((9, x.shape[1]), np.nan, dtype=np.float32), groups, gy)
    np.testing.assert_allclose(gw, gy.T @ x, rtol=1e-5)


def test_distinct_rows_run_the_plain_product() -> None:
    x = np.random.default_rng(3).random((7, 5), dtype=np.float32)
    assert row_groups(x) is None and row_groups(x[:1]) is None
    assert row_groups(np.stack([x[0], x[1], x[2], x[2]])) is None  # 3 of 4 rows distinct: more than half
    w = np.random.default_rng(4).random((5, 3), dtype=np.float32)
    np.testing.assert_array_equal(rows_times(x, w), x @ w)


def test_rows_compare_bytewise() -> None:
    x = np.zeros((4, 3), dtype=np.float32)
    x[1, 0] = -0.0  # equal as numbers, not as bytes: kept apart (exact products either way)
    groups = row_groups(x)
    assert groups is not None and groups.unique.shape[0] == 2 and list(groups.inverse) == [0, 1, 0, 0]


def test_tiny_vit_counts_equal_the_per_token_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The channel tape on a ViT (two distinct token rows: class token, patches) against the
    previous per-token products (grouping off): the same log P and dlogP/dW up to float rounding."""
    import torch

    import pai_compiler.passes.criteria.dpai.tape as tape
    from pai_compiler.passes.analysis.bindings import sample_bindings
    from pai_compiler.pass_infra import PassManager
    from pai_compiler.pipeline import parse_pipeline
    from pai_compiler.frontends.onnx.reader import load_onnx_model
    from pai_compiler.passes.criteria.dpai.driver import build, initial_scores

    g = load_onnx_model(Path(__file__).resolve().parents[1] / "examples" / "models" / "tiny_vit.onnx")
    keep = dict(PassManager(parse_pipeline("erk{sparsity=0.9}")).run(g)[0].report.keep)
    grouped: list[int] = []

    def counting(rows: np.ndarray) -> object:
        found = row_groups(rows)
        grouped.append(0 if found is None else rows.shape[0] - found.unique.shape[0])
        return found

    results = []
    for groups in (counting, lambda rows: None):
        monkeypatch.setattr(tape, "row_groups", groups)
        layout, topk, update, step = build(g, g.prunable_params(), keep, "channel", 0.99, 0.5, "cpu", sample_bindings(g), "index")
        kept = update.kept(topk.select(initial_scores(layout, 1, "cpu")))
        step.program.counts.zero_()
        step.program.counts.index_add_(0, kept.kernel, update.ones)
        results.append((float(step.program.forward_backward()), step.program.grad.clone()))
    assert sum(grouped) > 0, "no linear layer saw repeated token rows"
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-9)
