"""IR invariants: use-lists, versions, verify(), clone(), the printer."""
from __future__ import annotations

import numpy as np
import pytest

from pai_compiler.errors import VerificationError
from pai_compiler.ir import Graph, OpKind, Param, to_text


def small_graph() -> Graph:
    g = Graph("tiny")
    x = g.add_node(OpKind.INPUT, "x", (), [("x", (1, 4), "float32")]).outputs[0]
    w = Param("fc.weight", np.arange(12, dtype=np.float32).reshape(3, 4), prunable=True)
    y = g.add_node(OpKind.LINEAR, "fc", [x], [("y", (1, 3), "float32")], params={"weight": w}).outputs[0]
    r = g.add_node(OpKind.POINTWISE, "relu", [y], [("r", (1, 3), "float32")], attrs={"op": "relu"}).outputs[0]
    g.add_node(OpKind.OUTPUT, "out", [r])
    return g


def test_use_lists_and_version() -> None:
    g = small_graph()
    g.verify()
    y = g.value("y")
    assert [n.name for n in y.uses] == ["relu"]
    v0 = g.version
    extra = g.add_node(OpKind.POINTWISE, "neg", [y], [("n", (1, 3), "float32")], attrs={"op": "neg"})
    assert g.version > v0 and extra in y.uses
    g.replace_all_uses(g.value("r"), extra.outputs[0])
    g.verify()
    g.remove_node(g.node("relu"))
    g.verify()
    assert [n.name for n in g.nodes] == ["x", "fc", "neg", "out"]


def test_remove_used_node_is_refused() -> None:
    g = small_graph()
    with pytest.raises(VerificationError, match="still used"):
        g.remove_node(g.node("fc"))


def test_verify_catches_broken_invariants() -> None:
    g = small_graph()
    g.value("y").uses.clear()  # corrupt a use-list behind the graph's back
    with pytest.raises(VerificationError, match="use-list"):
        g.verify()
    g = small_graph()
    p = g.node("fc").params["weight"]
    p._mask = np.ones((2, 2), dtype=bool)
    with pytest.raises(VerificationError, match="mask"):
        g.verify()


def test_set_mask_validates_and_bumps_version() -> None:
    g = small_graph()
    p = g.prunable_params()[0]
    v = g.version
    g.set_mask(p, np.eye(3, 4))
    assert g.version == v + 1 and p.mask.dtype == np.bool_ and p.kept() == 3
    with pytest.raises(VerificationError):
        g.set_mask(p, np.ones((4, 3)))


def test_clone_is_independent() -> None:
    g = small_graph()
    c = g.clone()
    c.set_mask(c.prunable_params()[0], np.zeros((3, 4)))
    assert g.prunable_params()[0].mask is None
    assert c.prunable_params()[0].data is g.prunable_params()[0].data  # weights shared read-only
    c.remove_node(c.node("out"))
    assert len(g) == 4 and len(c) == 3


def test_cycle_detection_in_sort() -> None:
    g = small_graph()
    relu = g.node("relu")
    with pytest.raises(VerificationError, match="cycle"):
        g.set_input(g.node("fc"), 0, relu.outputs[0])  # fc <- relu <- fc


def test_printer_is_stable() -> None:
    g = small_graph()
    g.set_mask(g.prunable_params()[0], np.eye(3, 4))
    assert to_text(g) == (
        "graph tiny {\n"
        "  %x: float32[1,4] = input()\n"
        "  %y: float32[1,3] = linear(%x) [weight: fc.weight[3, 4] kept 3/12]\n"
        "  %r: float32[1,3] = pointwise(%y) {op=relu}\n"
        "  output(%r)\n"
        "}\n"
    )
    assert to_text(g.clone()) == to_text(g)


def test_param_oi_views_round_trip() -> None:
    p = Param("w", np.arange(24).reshape(2, 3, 4), prunable=True, out_axis=2, in_axis=0)
    oi = p.to_oi(p.data)
    assert oi.shape == (4, 2, 3)
    assert np.array_equal(p.from_oi(oi), p.data)
