"""Linear layers on distinct rows (``distinct_rows=True``) count the same paths, with the same gradients."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pai_compiler.frontends.onnx.reader import load_onnx_model  # noqa: E402
from pai_compiler.interp_tables import _equal_row_runs, _linear_by_distinct_rows  # noqa: E402
from pai_compiler.passes.analysis.paths import count_paths, path_gradients  # noqa: E402

TINY_VIT = Path(__file__).resolve().parents[1] / "examples" / "models" / "tiny_vit.onnx"


def test_linear_on_repeated_rows_matches_plain_linear_and_its_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    distinct = torch.rand(3, 8, generator=gen, dtype=torch.float64)
    x = distinct[torch.tensor([0, 1, 1, 1, 1, 2, 2, 0, 0, 0])].reshape(2, 5, 8).requires_grad_()
    w = torch.rand(6, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    runs = _equal_row_runs(x.detach().reshape(-1, 8))
    assert runs is not None and runs[0].shape[0] == 4  # four runs of ten rows: the short GEMM is taken
    y = _linear_by_distinct_rows(x, w)
    cot = torch.rand(y.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((y * cot).sum(), [x, w])
    ref = torch.nn.functional.linear(x, w)
    want = torch.autograd.grad((ref * cot).sum(), [x, w])
    torch.testing.assert_close(y, ref)
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h)
    assert _equal_row_runs(torch.rand(6, 4, generator=gen)) is None  # all distinct: plain linear


def test_path_count_and_gradients_equal_with_distinct_rows() -> None:
    graph = load_onnx_model(TINY_VIT)
    rng = np.random.default_rng(1)
    for p in graph.prunable_params():
        graph.set_mask(p, rng.random(p.shape) < 0.3)
    results = []
    for distinct in (False, True):
        leaves = {p.name: torch.as_tensor(p.mask, dtype=torch.float64).requires_grad_() for p in graph.prunable_params()}
        with torch.enable_grad():
            count = count_paths(graph, "exact", {"batch": 1}, dtype=torch.float64, weights=leaves, distinct_rows=distinct)
            grads = path_gradients(count.log_paths, list(leaves.values()))
        results.append((float(count.log_paths.detach()), grads))
    (plain, plain_grads), (short, short_grads) = results
    assert short == pytest.approx(plain, rel=1e-12)
    for a, b in zip(plain_grads, short_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
