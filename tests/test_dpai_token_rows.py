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


@pytest.mark.parametrize(("a_shape", "b_shape"), [((2, 3, 5, 4), (2, 3, 4, 6)), ((3, 5, 4), (2, 1, 4, 6)), ((1, 3, 5, 4), (4, 6)), ((5, 4), (2, 4, 6))])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_gate_product_by_sums_equals_the_gate_rule(a_shape: tuple[int, ...], b_shape: tuple[int, ...], backend: str) -> None:
    """paths(A @ B) = A @ 1 + 1 @ B by row and column sums, forward and backward, broadcast batch axes included."""
    import torch

    from pai_compiler.passes.criteria.dpai.gate import GateMatMul
    from pai_compiler.passes.criteria.dpai.ops import NumpyOps, TorchOps

    rng = np.random.default_rng(5)
    a, b = (torch.from_numpy(rng.random(s, dtype=np.float32)).requires_grad_(True) for s in (a_shape, b_shape))
    want = torch.matmul(a, torch.ones_like(b)) + torch.matmul(torch.ones_like(a), b)
    g = torch.from_numpy(rng.random(tuple(want.shape), dtype=np.float32))
    want_a, want_b = torch.autograd.grad(want, [a, b], g)
    ops = NumpyOps() if backend == "numpy" else TorchOps("cpu")
    instr = GateMatMul(ops, 0, 1, 2, a_shape, b_shape, tuple(want.shape))
    env: list[object] = [ops.wrap(a), ops.wrap(b), None]
    instr.forward(env)
    genv: list[object] = [None, None, ops.wrap(g)]
    instr.backward(env, genv)
    for got, expected in ((env[2], want), (genv[0], want_a), (genv[1], want_b)):
        got_t = torch.as_tensor(np.array(got)) if backend == "numpy" else got
        assert tuple(got_t.shape) == tuple(expected.shape)
        torch.testing.assert_close(got_t, expected.detach(), rtol=1e-5, atol=1e-5)


def _tape_counts(graph: object, monkeypatch: pytest.MonkeyPatch, per_token: bool) -> tuple[float, object, list[str]]:
    """log P, dlogP/dW and the tape's instruction names of one channel step on ``graph`` (ERK 90 %, seed 1);
    ``per_token``: the previous computation (every product under the interpreter's rule, no row groups)."""
    import pai_compiler.passes.criteria.dpai.channel_program as channel_program
    import pai_compiler.passes.criteria.dpai.tape as tape
    from pai_compiler.ir import OpKind
    from pai_compiler.passes.analysis.bindings import sample_bindings
    from pai_compiler.pass_infra import PassManager
    from pai_compiler.pipeline import parse_pipeline
    from pai_compiler.passes.criteria.dpai.driver import build, initial_scores

    if per_token:
        monkeypatch.setattr(tape, "row_groups", lambda rows: None)
        monkeypatch.setitem(channel_program.CHANNEL_RULES, OpKind.MATMUL, lambda cp, node: cp._torch_op(node))
        monkeypatch.setattr(channel_program, "_take", lambda cp, node: cp._torch_op(node))
    keep = dict(PassManager(parse_pipeline("erk{sparsity=0.9}")).run(graph)[0].report.keep)
    layout, topk, update, step = build(graph, graph.prunable_params(), keep, "channel", 0.99, 0.5, "cpu", sample_bindings(graph), "index")
    kept = update.kept(topk.select(initial_scores(layout, 1, "cpu")))
    step.program.counts.zero_()
    step.program.counts.index_add_(0, kept.kernel, update.ones)
    log_p = float(step.program.forward_backward())
    monkeypatch.undo()
    return log_p, step.program.grad.clone(), [type(i).__name__ for i in step.program.tape]


@pytest.mark.parametrize("model", ["tiny_vit", "bert", "gpt2"])
def test_structured_tape_equals_the_per_token_one(model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The channel tape with the gate products by sums and the token-row linears against the
    per-token computation (the interpreter's GEMM gate rule, every row multiplied): the same log P
    and dlogP/dW up to float rounding, on tiny_vit and Hugging Face exports (BERT, GPT-2: causal mask)."""
    import torch

    from pai_compiler.frontends.onnx.reader import load_onnx_model

    if model == "tiny_vit":
        path = Path(__file__).resolve().parents[1] / "examples" / "models" / "tiny_vit.onnx"
    else:
        pytest.importorskip("transformers")
        from hf_exports import CASES, export_case

        path = export_case(CASES[model], "torchscript", tmp_path / f"{model}.onnx", attention="eager")
    graph = load_onnx_model(path)
    log_p, grad, names = _tape_counts(graph, monkeypatch, per_token=False)
    log_p_ref, grad_ref, names_ref = _tape_counts(graph, monkeypatch, per_token=True)
    assert "GateMatMul" in names and not {"GateMatMul", "Take"} & set(names_ref)
    assert log_p == pytest.approx(log_p_ref, rel=1e-6)
    assert float(grad.abs().max()) > 0
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(("indices", "axis"), [([1], 0), ([2, 0], 1), ([-1, 0, -1], 1), ([[0, 2], [1, 1]], 2)])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_take_equals_index_select_and_its_backward(indices: list[object], axis: int, backend: str) -> None:
    """``Take`` (a gather by constant indices) against torch's index_select under autograd, bit for bit:
    a scalar-like single index, negative and repeated indices (their gradients add), an index matrix."""
    import torch

    from pai_compiler.passes.criteria.dpai.ops import NumpyOps, TorchOps
    from pai_compiler.passes.criteria.dpai.tape import Take

    index = np.asarray(indices, dtype=np.int64)
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.random((3, 4, 5), dtype=np.float32)).requires_grad_(True)
    flat = np.where(index.reshape(-1) < 0, index.reshape(-1) + x.shape[axis], index.reshape(-1))
    want = torch.index_select(x, axis, torch.from_numpy(flat)).reshape(*x.shape[:axis], *index.shape, *x.shape[axis + 1 :])
    g = torch.from_numpy(rng.random(tuple(want.shape), dtype=np.float32))
    (want_x,) = torch.autograd.grad(want, [x], g)
    ops = NumpyOps() if backend == "numpy" else TorchOps("cpu")
    instr = Take(ops, 0, 1, flat if backend == "numpy" else torch.from_numpy(flat), axis, tuple(x.shape), tuple(want.shape))
    env: list[object] = [ops.wrap(x), None]
    instr.forward(env)
    genv: list[object] = [None, ops.wrap(g)]
    instr.backward(env, genv)
    for got, expected in ((env[1], want), (genv[0], want_x)):
        torch.testing.assert_close(torch.as_tensor(np.array(got)) if backend == "numpy" else got, expected.detach(), rtol=0, atol=0)
