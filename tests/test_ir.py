"""IR invariants: use-lists, versions, verify(), clone(), replace_params(), the printer on builder graphs."""
from __future__ import annotations

import numpy as np
import pytest

from pai_compiler.errors import VerificationError
from pai_compiler.ir import Graph, GraphBuilder, OpKind, Param, to_text


def small_graph() -> Graph:
    b = GraphBuilder("tiny")
    w = b.param("fc1.weight", (3, 4), data=np.arange(12, dtype=np.float32).reshape(3, 4))
    return b.build(b.relu(b.linear(b.input((1, 4)), 3, weight=w)))


def test_use_lists_and_version() -> None:
    g = small_graph()
    g.verify()
    y = g.value("fc1")
    assert [n.name for n in y.uses] == ["relu1"]
    v0 = g.version
    extra = g.add_node(OpKind.POINTWISE, "neg", [y], [("n", (1, 3), "float32")], attrs={"op": "neg"})
    assert g.version > v0 and extra in y.uses
    g.replace_all_uses(g.value("relu1"), extra.outputs[0])
    g.verify()
    g.remove_node(g.node("relu1"))
    g.verify()
    assert [n.name for n in g.nodes] == ["x", "fc1", "neg", "out"]


def test_remove_used_node_is_refused() -> None:
    g = small_graph()
    with pytest.raises(VerificationError, match="still used"):
        g.remove_node(g.node("fc1"))


def test_verify_catches_broken_invariants() -> None:
    g = small_graph()
    g.value("fc1").uses.clear()  # corrupt a use-list behind the graph's back
    with pytest.raises(VerificationError, match="use-list"):
        g.verify()
    g = small_graph()
    p = g.node("fc1").params["weight"]
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
    relu = g.node("relu1")
    with pytest.raises(VerificationError, match="cycle"):
        g.set_input(g.node("fc1"), 0, relu.outputs[0])  # fc <- relu <- fc


def test_printer_is_stable() -> None:
    g = small_graph()
    g.set_mask(g.prunable_params()[0], np.eye(3, 4))
    assert to_text(g) == (
        "graph tiny {\n"
        "  %x: float32[1,4] = input()\n"
        "  %fc1: float32[1,3] = linear(%x) {in_features=4, out_features=3} [weight: fc1.weight[3, 4] kept 3/12]\n"
        "  %relu1: float32[1,3] = pointwise(%fc1) {op=relu}\n"
        "  output(%relu1)\n"
        "}\n"
    )
    assert to_text(g.clone()) == to_text(g)


def test_param_oi_views_round_trip() -> None:
    p = Param("w", np.arange(24).reshape(2, 3, 4), prunable=True, out_axis=2, in_axis=0)
    oi = p.to_oi(p.data)
    assert oi.shape == (4, 2, 3)
    assert np.array_equal(p.from_oi(oi), p.data)


def test_replace_params_checks_and_bumps_version() -> None:
    g = small_graph()
    fc = g.node("fc1")
    old = fc.params["weight"]
    new = Param("fc1.weight", np.ones((3, 4), np.float32), prunable=True)
    bias = Param("fc1.bias", np.zeros(3, np.float32))
    v = g.version
    g.replace_params(fc, {"weight": new, "bias": bias})
    assert g.version == v + 1 and fc.params == {"weight": new, "bias": bias}
    assert g.param_users(old) == [] and g.param_users(new) == [fc]
    g.verify()
    bad = Param("bad", np.ones((3, 4), np.float32), prunable=True, in_axis=0)
    with pytest.raises(VerificationError, match="in_axis equals out_axis"):
        g.replace_params(fc, {"weight": bad})
    assert fc.params["weight"] is new and g.version == v + 1  # refused: nothing changed
    with pytest.raises(VerificationError, match="not in the graph"):
        g.replace_params(small_graph().node("fc1"), {})


def test_a_long_graph_pickles_and_deep_copies_without_deep_recursion() -> None:
    """Graph state is flat (a record per node): pickle and ``copy.deepcopy`` of a graph several times
    longer than Python's recursion limit give the same graph, the shared Param still one object."""
    import copy
    import pickle

    g = Graph("long")
    x = g.add_node(OpKind.INPUT, "x", [], [("x", (1, 4), "float32")]).outputs[0]
    shared = Param("w", np.ones((4, 4), np.float32), prunable=True)
    for i in range(3000):
        params = {"weight": shared} if i in (0, 2999) else {}
        kind = OpKind.LINEAR if params else OpKind.POINTWISE
        x = g.add_node(kind, f"n{i}", [x], [(f"v{i}", (1, 4), "float32")], params=params, attrs={} if params else {"op": "relu"}).outputs[0]
    g.add_node(OpKind.OUTPUT, "y", [x])
    g.fresh_name("c")
    for other in (copy.deepcopy(g), pickle.loads(pickle.dumps(g))):
        other.verify()
        assert to_text(other) == to_text(g) and other.version == g.version
        assert other.node("n0").params["weight"] is other.node("n2999").params["weight"]
        assert other.fresh_name("c") == "c_1"


def test_a_graph_pickled_by_an_earlier_paic_still_loads() -> None:
    """Before the flat state, a Graph pickled its attribute dict (``_nodes``, ``_values``, ...): a ``.pt``
    module saved then must still load."""
    g = Graph("old")
    x = g.add_node(OpKind.INPUT, "x", [], [("x", (1, 4), "float32")]).outputs[0]
    y = g.add_node(OpKind.LINEAR, "fc", [x], [("y", (1, 4), "float32")], params={"weight": Param("w", np.ones((4, 4), np.float32), prunable=True)}).outputs[0]
    g.add_node(OpKind.OUTPUT, "out", [y])
    old_state = {k: v for k, v in g.__dict__.items() if k != "_handed_out"}
    revived = Graph.__new__(Graph)
    revived.__setstate__(old_state)
    revived.verify()
    assert to_text(revived) == to_text(g) and revived.fresh_name("fc") == "fc_1"


def test_a_graph_pickled_when_the_node_types_lived_in_ir_core_still_loads() -> None:
    """OpKind, Param, Value and Node moved from ``ir.core`` to ``ir.nodes``: a ``.pt`` module pickled
    before names them ``pai_compiler.ir.core.X``, which must still resolve to the same classes."""
    import pickle

    g = small_graph()
    g.set_mask(g.node("fc1").params["weight"], np.ones(g.node("fc1").params["weight"].shape, dtype=bool))
    data = pickle.dumps(g, protocol=2)  # protocol 2 names a class as text: ``c<module>\n<name>\n``
    assert b"cpai_compiler.ir.nodes\n" in data
    revived = pickle.loads(data.replace(b"cpai_compiler.ir.nodes\n", b"cpai_compiler.ir.core\n"))
    revived.verify()
    assert to_text(revived) == to_text(g)
