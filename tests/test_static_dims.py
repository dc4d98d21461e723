"""Symbolic dims bound at load (``static_dims``) and the dim helpers that keep sympy unloaded.

The audit binds every unbound symbol to 1; binding them at load instead must give the same
document (MACs, paths, nodes, kernels) on dynamic-batch exports, and a mapping binds only the
dims it names. ``floor_div``/``ceil_div`` agree with sympy's floor/ceiling on ints and symbols.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from pai_compiler.api import load_model
from pai_compiler.audit import audit_graph
from pai_compiler.ir import Graph
from pai_compiler.ir.dims import ceil_div, dim_sum, floor_div, is_symbolic

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"


def _dims(graph: Graph) -> list[object]:
    return [d for node in graph.nodes for v in node.outputs for d in (v.shape or ())]


@pytest.mark.parametrize("name", ["resnet20", "tiny_vit", "vgg_small"])
def test_bound_at_load_audits_like_the_symbolic_graph(name: str) -> None:
    symbolic = load_model(EXAMPLES / f"{name}.onnx")
    static = load_model(EXAMPLES / f"{name}.onnx", static_dims=1)
    names = {str(s) for s in symbolic.meta["symbols"]}
    assert names and not static.meta["symbols"]
    assert static.meta["bound_dims"] == dict.fromkeys(names, 1)
    assert any(is_symbolic(d) for d in _dims(symbolic))
    assert all(isinstance(d, int) for d in _dims(static))
    assert audit_graph(static) == audit_graph(symbolic)


def _two_symbol_model(path: Path) -> Path:
    """x[batch, seq, 8] @ W[8, 4] -> y[batch, seq, 4]."""
    w = numpy_helper.from_array(np.arange(32, dtype=np.float32).reshape(8, 4), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_mapping_binds_only_the_dims_it_names(tmp_path: Path) -> None:
    path = _two_symbol_model(tmp_path / "two.onnx")
    graph = load_model(path, static_dims={"seq": 3})
    assert graph.meta["bound_dims"] == {"seq": 3} and set(map(str, graph.meta["symbols"])) == {"batch"}
    (x,) = graph.inputs
    assert str(x.shape[0]) == "batch" and x.shape[1:] == (3, 8)
    bound = audit_graph(graph, bind={"batch": 5}, paths=False)["totals"]["macs_dense"]
    assert bound == audit_graph(load_model(path), bind={"batch": 5, "seq": 3}, paths=False)["totals"]["macs_dense"] == 5 * 3 * 32


@settings(max_examples=200, deadline=None)
@given(st.integers(-1000, 1000), st.integers(1, 50), st.integers(1, 30))
def test_floor_and_ceil_div_agree_with_sympy(a: int, b: int, n: int) -> None:
    assert floor_div(a, b) == a // b == int(sympy.floor(sympy.Rational(a, b)))
    assert ceil_div(a, b) == int(sympy.ceiling(sympy.Rational(a, b)))
    assert floor_div(np.int64(a), np.int32(b)) == a // b and type(floor_div(np.int64(a), b)) is int
    s = sympy.Symbol("s", integer=True, positive=True)
    assert floor_div(s + a, b).subs(s, n) == (n + a) // b
    assert ceil_div(s + a, b).subs(s, n) == -(-(n + a) // b)
    assert dim_sum([a, np.int64(b), n]) == a + b + n and (dim_sum([s, a]) - a) == s
