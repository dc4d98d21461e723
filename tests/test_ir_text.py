"""The IR's text form: golden text of builder graphs, and parse(to_text(g)) printing the same."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sympy

from fixture_graphs import BUILT_GRAPHS, attention_graph
from pai_compiler.frontends.onnx import load_onnx_model
from pai_compiler.ir import Graph, GraphBuilder, IRSyntaxError, OpKind, Param, parse, to_text
from pai_compiler.pass_infra import AnalysisManager
from pai_compiler.passes.analysis.node_path import NodePathPass

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"

RESIDUAL_TEXT = """\
graph block {
  %x: float32[1,2,4,4] = input()
  %conv1: float32[1,2,4,4] = conv(%x) {dilations=[1,1], groups=1, kernel_shape=[3,3], pads=[1,1,1,1], strides=[1,1]} [weight: conv1.weight[2, 2, 3, 3] kept 36/36]
  %relu1: float32[1,2,4,4] = pointwise(%conv1) {op=relu}
  %add1: float32[1,2,4,4] = add(%relu1, %x) {op=add}
  %gap1: float32[1,2,1,1] = pool(%add1) {axes=[2,3], keepdims=True, mode=avg, reduce=True}
  %flatten1: float32[1,2] = reshape(%gap1) {op=reshape, shape=[1,2]}
  %fc1: float32[1,3] = linear(%flatten1) {in_features=2, out_features=3} [weight: fc1.weight[3, 2] kept 6/6]
  output(%fc1)
}
"""


def test_builder_residual_block_prints_its_golden_text() -> None:
    b = GraphBuilder("block")
    x = b.input((1, 2, 4, 4))
    joined = b.add(b.relu(b.conv(x, 2, 3, pad=1)), x)
    g = b.build(b.linear(b.flatten(b.global_pool(joined)), 3))
    assert to_text(g) == RESIDUAL_TEXT
    assert to_text(parse(RESIDUAL_TEXT)) == RESIDUAL_TEXT


def test_builder_shapes_attention_and_strided_conv() -> None:
    g = attention_graph()
    lines = to_text(g).splitlines()
    assert lines[5] == "  %transpose1: float32[batch,8,5] = reshape(%fc2) {op=transpose, perm=[0,2,1]}"
    assert lines[6] == "  %matmul1: float32[batch,5,5] = matmul(%fc1, %transpose1)"
    assert g.node("fc2").params["weight"].out_axis == 1  # stored (in, out), as ONNX MatMul keeps it
    b = GraphBuilder()
    y = b.conv(b.input((2, 4, 9, 9)), 6, 3, stride=2, pad=1, dilation=2, groups=2)
    assert y.shape == (2, 6, 4, 4) and b.weight_of(y).shape == (6, 2, 3, 3)


def _example(name: str) -> Graph:
    g = load_onnx_model(EXAMPLES / f"{name}.onnx")
    rng = np.random.default_rng(0)
    for p in g.prunable_params()[::3]:  # some masked, some dense
        g.set_mask(p, rng.random(p.shape) < 0.3)
    return g


@pytest.mark.parametrize("name", ["resnet20", "vgg_small", "tiny_vit"])
def test_example_models_round_trip(name: str) -> None:
    text = to_text(_example(name))
    parsed = parse(text)
    assert to_text(parsed) == text
    batch = sympy.Symbol("batch", integer=True, positive=True)
    assert parsed.inputs[0].shape[0] == batch  # the same symbol the frontends make
    assert parsed.version == 0


@pytest.mark.parametrize("name", sorted(BUILT_GRAPHS))
def test_built_graphs_round_trip_with_the_same_paths(name: str) -> None:
    g = BUILT_GRAPHS[name]()
    parsed = parse(to_text(g))
    assert to_text(parsed) == to_text(g)
    want, got = (AnalysisManager(h).get(NodePathPass()) for h in (g, parsed))  # dense: masks agree
    assert got.log_paths == pytest.approx(want.log_paths) and got.effective_params == want.effective_params


def _odd_graph() -> Graph:
    """Symbolic dims, unknown shapes, two outputs, an opaque op, arrays, ties, constants, masks."""
    batch = sympy.Symbol("batch", integer=True, positive=True)
    b = GraphBuilder("odd")
    x = b.input((batch, 4))
    tied = b.param("tied.weight", (4, 4))
    h = b.linear(b.linear(x, 4, weight=tied), 4, weight=tied)
    const = b.param("c", (1,), prunable=False)
    scaled = b.op(OpKind.POINTWISE, [h], (batch, 4), params={"const": const}, attrs={"op": "mul", "const_first": False})
    again = b.op(OpKind.POINTWISE, [scaled], (batch, 4), params={"const": b.param("c", (1,), prunable=False)}, attrs={"op": "mul"})
    split = b.graph.add_node(OpKind.SPLIT, "split1", [again], [("a", (batch, 1), "float32"), ("z", (batch, 3), "float32")],
                             attrs={"axis": 1, "sizes": [1, 3]})
    weird = b.op(OpKind.OPAQUE, [split.outputs[1]], None, attrs={"op_type": "Weird", "table": np.zeros((2, 3)), "alpha": -0.5,
                                                              "dims": [2 * batch + 1, 3], "label": "a b", "none": None})
    b.graph.set_mask(tied, np.eye(4, dtype=bool))
    return b.build(split.outputs[0], weird)


def test_hand_graph_round_trips_what_the_text_carries() -> None:
    g = _odd_graph()
    text = to_text(g)
    assert "[batch,4]" in text and "dims=[2*batch + 1,3]" in text and "table=array[2, 3]" in text
    parsed = parse(text)
    assert to_text(parsed) == text
    fc1, fc2 = parsed.node("fc1"), parsed.node("fc2")
    assert fc1.params["weight"] is fc2.params["weight"] and fc1.params["weight"].kept() == 4  # a tie stays one Param
    assert parsed.node("pointwise1").params["const"] is not parsed.node("pointwise2").params["const"]  # constants: one per use
    attrs = parsed.node("opaque1").attrs
    batch = sympy.Symbol("batch", integer=True, positive=True)
    assert attrs["dims"] == [2 * batch + 1, 3] and attrs["alpha"] == -0.5 and attrs["label"] == "a b" and attrs["none"] is None
    assert attrs["table"].shape == (2, 3) and parsed.value("opaque1").shape is None
    assert [v.name for v in parsed.outputs] == ["a", "opaque1"]
    assert not parsed.node("pointwise1").params["const"].prunable


def test_parse_skips_comments_from_print_ir_after_all() -> None:
    g = parse("// ----- IR after erk -----\n" + RESIDUAL_TEXT)
    assert g.name == "block" and len(g) == 8


MALFORMED = [
    ("", r"line 0: missing 'graph NAME \{'"),
    ("graf g {\n}\n", r"line 1: expected 'graph NAME \{'"),
    ("graph g {\n  %x: float32[1,2] = input()\n", r"line 2: missing closing '\}'"),
    ("graph g {\n  %x: float32[1,2] = input()\n  output(%y)\n}\n", r"line 3: %y is used before it is defined"),
    ("graph g {\n  %x: float32[1,2] = inptu()\n}\n", r"line 2: unknown op kind 'inptu'"),
    ("graph g {\n  %x float32[1,2] = input()\n}\n", r"line 2: expected %name: dtype\[shape\]"),
    ("graph g {\n  %x: float32[1,2] = input()\n  %x: float32[1,2] = pointwise(%x) {op=relu}\n  output(%x)\n}\n",
     r"line 3: .*'x' already exists"),
    ("graph g {\n  %x: float32[1,2] = input()\n  %y: float32[1,2] = pointwise(%x) {op}\n}\n", r"line 3: expected key=value"),
    ("graph g {\n  %x: float32[1,2] = input()\n  %y: float32[1,3] = linear(%x) [weight: w[3, 2] kept 7/6]\n}\n",
     r"line 3: param 'w': kept 7/6 does not fit"),
    ("graph g {\n  %x: float32[1,2] = input()\n  %y: float32[1,3] = linear(%x) [weight w]\n}\n", r"line 3: expected key: name\[shape\]"),
    ("graph g {\n  %x: float32[1,2] = input()\n}\n", r"line 3: graph has no output"),
    ("graph g {\n  %x: float32[1,2] = input()\n  output(%x)\n}\n  %y: float32[1] = input()\n", r"line 5: text after the closing"),
    ("graph g {\n  %x: float32[1,(2] = input()\n}\n", r"line 2: unbalanced brackets"),
]


@pytest.mark.parametrize(("text", "message"), MALFORMED)
def test_malformed_text_names_the_line(text: str, message: str) -> None:
    with pytest.raises(IRSyntaxError, match=message) as info:
        parse(text)
    assert "\n" not in str(info.value)


def test_parsed_params_are_ones_with_first_k_kept() -> None:
    g = parse(RESIDUAL_TEXT.replace("kept 36/36", "kept 5/36"))
    w = g.node("conv1").params["weight"]
    assert isinstance(w, Param) and w.prunable and np.all(w.data == 1)
    assert w.kept() == 5 and np.array_equal(np.flatnonzero(w.mask), np.arange(5))
