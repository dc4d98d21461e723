"""analysis.paths and analysis.bindings against closed forms; the interpreter's result object and rule tables."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import sympy
import torch

from pai_compiler.errors import PaicError
from pai_compiler.interp import InterpResult, Interpreter
from pai_compiler.interp_tables import RULES, rule_for
from pai_compiler.ir import Graph, OpKind, Param
from pai_compiler.passes.analysis.bindings import parse_bind, sample_bindings, static_batch
from pai_compiler.passes.analysis.paths import count_paths, ones_inputs, path_gradients

N = sympy.Symbol("N", integer=True, positive=True)
SEQ = sympy.Symbol("seq", integer=True, positive=True)


def _mlp(masks: list[np.ndarray], batch: int | sympy.Expr = 1) -> Graph:
    """x (batch, in) -> linear -> relu -> linear ...: one linear per mask, (out, in) weights."""
    g = Graph("mlp")
    x = g.add_node(OpKind.INPUT, "x", (), [("x", (batch, masks[0].shape[1]), "float32")]).outputs[0]
    for i, mask in enumerate(masks):
        p = Param(f"fc{i}.weight", np.ones(mask.shape, np.float32), prunable=True, out_axis=0, in_axis=1)
        p._mask = mask.copy()
        x = g.add_node(OpKind.LINEAR, f"fc{i}", [x], [(f"h{i}", (batch, mask.shape[0]), "float32")], params={"weight": p},
                       attrs={"in_features": mask.shape[1], "out_features": mask.shape[0]}).outputs[0]
        if i < len(masks) - 1:
            x = g.add_node(OpKind.POINTWISE, f"relu{i}", [x], [(f"r{i}", (batch, mask.shape[0]), "float32")], attrs={"op": "relu"}).outputs[0]
    g.add_node(OpKind.OUTPUT, "out", [x])
    g.verify()
    return g


def _masks(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((5, 6)) < 0.6, rng.random((4, 5)) < 0.6]


def _closed_form(masks: list[np.ndarray]) -> float:
    """P = 1ᵀ M_L ... M_1 1: every input->output path through kept weights, counted once."""
    vector = np.ones(masks[0].shape[1])
    for mask in masks:
        vector = mask.astype(float) @ vector
    return float(vector.sum())


def test_exact_and_ref_count_the_closed_form_on_a_chain() -> None:
    masks = _masks()
    g = _mlp(masks)
    with torch.no_grad():
        exact = count_paths(g, "exact", sample_bindings(g))
        ref = count_paths(g, "ref", sample_bindings(g))
    assert exact.log_paths.dtype == torch.float64 and ref.log_paths.dtype == torch.float32
    assert float(exact.log_paths) == pytest.approx(math.log(_closed_form(masks)), rel=1e-12)
    assert float(ref.log_paths) == pytest.approx(math.log(_closed_form(masks)), rel=1e-5)  # max-normalisation cancels on a chain
    assert float(ref.run.log_scale) > 0 and isinstance(exact.run, InterpResult)


def test_gradient_of_the_exact_count_is_the_closed_form() -> None:
    """d log P / d M1[i, j] = (1ᵀ M2)[i] / P, for kept and pruned weights alike."""
    masks = _masks(1)
    g = _mlp(masks)
    leaves = {f"fc{i}.weight": torch.as_tensor(m, dtype=torch.float64).requires_grad_(True) for i, m in enumerate(masks)}
    count = count_paths(g, "exact", sample_bindings(g), weights=leaves)
    first, second = path_gradients(count.log_paths, list(leaves.values()))
    total = _closed_form(masks)
    reach_out = masks[1].astype(float).sum(axis=0)  # paths from each hidden unit to the outputs
    assert first is not None and second is not None
    np.testing.assert_allclose(first.numpy(), np.outer(reach_out, np.ones(6)) / total, rtol=1e-12)
    np.testing.assert_allclose(second.numpy(), np.outer(np.ones(4), masks[0].astype(float).sum(axis=1)) / total, rtol=1e-12)


def test_no_surviving_path_is_minus_infinity_without_a_gradient() -> None:
    masks = [np.zeros((5, 6), bool), np.ones((4, 5), bool)]
    g = _mlp(masks)
    with torch.no_grad():
        assert float(count_paths(g, "exact", sample_bindings(g)).log_paths) == -math.inf
    assert path_gradients(torch.tensor(0.0), [torch.ones(2)]) == [None]


def test_one_sample_bindings_and_the_all_ones_input() -> None:
    g = _mlp(_masks(), batch=N)
    g.meta["symbols"] = {"seq": SEQ}
    assert sample_bindings(g, parse_bind("N=4,seq=7,other=3")) == {"N": 1, "seq": 7}  # the batch is one sample
    assert sample_bindings(g) == {"N": 1, "seq": 1}
    (ones,) = ones_inputs(g, sample_bindings(g), torch.float32)
    assert ones.shape == (1, 6) and bool((ones == 1).all())
    assert static_batch(g) == 1 and static_batch(_mlp(_masks(), batch=3)) == 3
    with pytest.raises(PaicError, match="not bound"):
        ones_inputs(g, {}, torch.float32)


def test_interpreter_returns_a_frozen_result_with_its_scales() -> None:
    g = _mlp(_masks())
    result = Interpreter(g, mode="paths", dtype=torch.float64, scaling="exact").run([torch.ones(1, 6, dtype=torch.float64)])
    assert set(result.values) >= {"x", "h0", "r0", "h1"} and len(result.outputs) == len(result.output_log_scales) == 1
    assert float(result.outputs[0].max()) == 1.0  # renormalised: the count is outputs * exp(scale)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.outputs = ()  # type: ignore[misc]


def test_every_kind_has_a_rule_in_both_semantics() -> None:
    assert set(OpKind) - set(RULES) == {OpKind.INPUT, OpKind.OUTPUT, OpKind.OPAQUE}
    g = _mlp(_masks())
    assert all(rule_for(n, "paths") is not None for n in g.nodes if n.kind not in (OpKind.INPUT, OpKind.OUTPUT))
