"""node-path vs brute force: enumerate element-level paths through kept weights on random small DAGs."""
from __future__ import annotations

import itertools
import math
from collections import defaultdict
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from pai_compiler.errors import PaicError
from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.ir import Graph, GraphBuilder, OpKind, Value
from pai_compiler.pass_infra import AnalysisManager
from pai_compiler.passes.analysis.node_path import NodePathPass, NodePathResult

# ---- tiny IR graphs through the builder, with random masks ----------------------------------


def sparse(b: GraphBuilder, y: Value, density: float, rng: np.random.RandomState) -> Value:
    """Mask the weight of ``y``'s layer at random, keeping each weight with probability ``density``."""
    if density < 1.0:
        w = b.weight_of(y)
        b.set_mask(y, rng.rand(*w.shape) < density)
    return y


# ---- an element-level graph, built independently of the interpreter -----------------------

Edge = tuple[tuple[str, tuple[int, ...]], tuple[str, tuple[int, ...]], Any]


def element_edges(g: Graph) -> list[Edge]:
    """(src element, dst element, (param name, weight index) or None) for every IR node."""
    edges: list[Edge] = []
    for node in g.nodes:
        if node.kind in (OpKind.INPUT, OpKind.OUTPUT):
            continue
        y = node.outputs[0]
        out_idx = list(itertools.product(*[range(d) for d in y.shape]))  # type: ignore[union-attr]
        if node.kind is OpKind.CONV:
            x, p, a = node.inputs[0], node.params["weight"], node.attrs
            cout, cin_g, k, _ = p.shape
            per_group = cout // a["groups"]
            for n, o, oy, ox in out_idx:
                g0 = (o // per_group) * cin_g
                for i, ky, kx in itertools.product(range(cin_g), range(k), range(k)):
                    iy = oy * a["strides"][0] - a["pads"][0] + ky * a["dilations"][0]
                    ix = ox * a["strides"][1] - a["pads"][1] + kx * a["dilations"][1]
                    if p.mask_or_ones()[o, i, ky, kx] and 0 <= iy < x.shape[2] and 0 <= ix < x.shape[3]:  # type: ignore[index]
                        edges.append(((x.name, (n, g0 + i, iy, ix)), (y.name, (n, o, oy, ox)), (p.name, (o, i, ky, kx))))
        elif node.kind is OpKind.LINEAR:
            x, p = node.inputs[0], node.params["weight"]
            for idx in out_idx:
                for i in range(p.shape[p.in_axis]):  # type: ignore[index]
                    stored = (idx[-1], i) if p.out_axis == 0 else (i, idx[-1])
                    if p.mask_or_ones()[stored]:
                        edges.append(((x.name, (*idx[:-1], i)), (y.name, idx), (p.name, stored)))
        elif node.kind is OpKind.MATMUL:  # gate rule: a path runs through one factor
            a, b = node.inputs
            for idx in out_idx:
                *batch, i, j = idx
                for k in range(a.shape[-1]):  # type: ignore[index]
                    edges.append(((a.name, (*batch, i, k)), (y.name, idx), None))
                    edges.append(((b.name, (*batch, k, j)), (y.name, idx), None))
        elif node.kind is OpKind.POOL and node.attrs["reduce"]:
            x = node.inputs[0]
            for n, c, h, w in itertools.product(*[range(d) for d in x.shape]):  # type: ignore[union-attr]
                edges.append(((x.name, (n, c, h, w)), (y.name, (n, c, 0, 0)), None))
        elif node.kind is OpKind.POOL:
            x, a = node.inputs[0], node.attrs
            k, s = a["kernel_shape"][0], a["strides"][0]
            for n, c, oy, ox in out_idx:
                for ky, kx in itertools.product(range(k), range(k)):
                    edges.append(((x.name, (n, c, oy * s + ky, ox * s + kx)), (y.name, (n, c, oy, ox)), None))
        elif node.kind is OpKind.RESHAPE and node.attrs["op"] == "transpose":
            perm = node.attrs["perm"]
            for idx in out_idx:
                src = [0] * len(idx)
                for pos, axis in enumerate(perm):
                    src[axis] = idx[pos]
                edges.append(((node.inputs[0].name, tuple(src)), (y.name, idx), None))
        elif node.kind is OpKind.RESHAPE:
            x = node.inputs[0]
            for flat, idx in enumerate(itertools.product(*[range(d) for d in x.shape])):  # type: ignore[union-attr]
                edges.append(((x.name, idx), (y.name, np.unravel_index(flat, y.shape)), None))  # type: ignore[arg-type]
        elif node.kind is OpKind.ADD:
            for x in node.inputs:
                edges += [((x.name, idx), (y.name, idx), None) for idx in out_idx]
        elif node.kind is OpKind.CONCAT:
            offset = 0
            for x in node.inputs:
                for n, c, h, w in itertools.product(*[range(d) for d in x.shape]):  # type: ignore[union-attr]
                    edges.append(((x.name, (n, c, h, w)), (y.name, (n, offset + c, h, w)), None))
                offset += x.shape[1]  # type: ignore[index]
        elif node.kind in (OpKind.POINTWISE, OpKind.SOFTMAX):
            edges += [((node.inputs[0].name, idx), (y.name, idx), None) for idx in out_idx]
        else:
            raise AssertionError(node.kind)
    return [((a, tuple(int(i) for i in ai)), (b, tuple(int(i) for i in bi)), lab) for (a, ai), (b, bi), lab in edges]


def brute_force(g: Graph, limit: int = 30_000) -> tuple[int, set[tuple[str, tuple[int, ...]]]]:
    """Literally enumerate every input->output path (DFS); return the count and the effective weights."""
    edges = element_edges(g)
    succ: dict[Any, list[Edge]] = defaultdict(list)
    pred: dict[Any, list[Edge]] = defaultdict(list)
    for e in edges:
        succ[e[0]].append(e)
        pred[e[1]].append(e)
    # paths start at float inputs only: an integer/bool input (indices, a mask) is index data
    sources = [(v.name, idx) for v in g.inputs if v.dtype.startswith(("float", "bfloat")) for idx in itertools.product(*[range(d) for d in v.shape])]  # type: ignore[union-attr]
    sinks = {(v.name, idx) for v in g.outputs for idx in itertools.product(*[range(d) for d in v.shape])}  # type: ignore[union-attr]
    # a memoised count first, only to skip examples too big to enumerate
    memo: dict[Any, int] = {}
    for elem in reversed(_topo(g, sources, succ)):
        memo[elem] = (1 if elem in sinks else 0) + sum(memo.get(e[1], 0) for e in succ[elem])
    if sum(memo.get(s, 0) for s in sources) > limit:
        assume(False) if currently_in_test_context() else pytest.fail("too many paths to enumerate")
    count = 0
    for s in sources:
        stack = [s]
        while stack:
            elem = stack.pop()
            count += elem in sinks
            stack.extend(e[1] for e in succ[elem])
    forward = _closure(sources, succ, 1)
    backward = _closure(list(sinks), pred, 0)
    effective = {e[2] for e in edges if e[2] is not None and e[0] in forward and e[1] in backward}
    return count, effective


def _topo(g: Graph, sources: list[Any], succ: dict[Any, list[Edge]]) -> list[Any]:
    order = {v.name: i for i, n in enumerate(g.nodes) for v in n.outputs}
    elems = {e for es in succ.values() for edge in es for e in (edge[0], edge[1])} | set(sources)
    return sorted(elems, key=lambda e: order[e[0]])


def _closure(start: list[Any], adjacency: dict[Any, list[Edge]], end: int) -> set[Any]:
    seen, stack = set(start), list(start)
    while stack:
        for e in adjacency[stack.pop()]:
            if e[end] not in seen:
                seen.add(e[end])
                stack.append(e[end])
    return seen


def analyse(g: Graph) -> NodePathResult:
    return AnalysisManager(g).get(NodePathPass())


def check_against_brute_force(g: Graph) -> None:
    count, effective = brute_force(g)
    res = analyse(g)
    if count == 0:
        assert res.log_paths == -math.inf
    else:
        assert res.log_paths == pytest.approx(math.log(count), abs=1e-9)
    for row in res.layers:
        got = {(row.param, tuple(int(i) for i in idx)) for idx in np.argwhere(row.effective)}
        want = {lab for lab in effective if lab[0] == row.param}
        assert got == want, row.param
        p = next(p for p in g.prunable_params() if p.name == row.param)
        pairs = {(lab[1][p.out_axis], lab[1][p.in_axis]) for lab in want}  # type: ignore[index]
        outs = {o for o, _ in pairs}
        assert row.effective_params == len(want)
        assert row.effective_nodes == len(outs)
        assert row.effective_kernels == len(pairs)
        assert row.total_nodes == p.shape[p.out_axis]
        node = g.node(row.nodes[0])
        if node.kind is OpKind.CONV:
            per_group = p.shape[0] // node.attrs["groups"]
            inputs = {(o // per_group) * p.shape[1] + i for o, i in pairs}
            assert row.npb_nodes == (0 if row.shortcut else len(inputs))
        else:
            assert row.npb_nodes == len(outs) + len({i for _, i in pairs})


# ---- random DAGs ---------------------------------------------------------------------------


@st.composite
def random_dags(draw: Any) -> Graph:
    rng = np.random.RandomState(draw(st.integers(0, 2**31 - 1)))
    density = lambda: draw(st.sampled_from([0.25, 0.5, 0.8, 1.0]))  # noqa: E731
    b = GraphBuilder("random")
    x = b.input((1, draw(st.integers(1, 2)), 4, 4))

    def conv(x: Value, cout: int, k: int, **kw: int) -> Value:
        return sparse(b, b.conv(x, cout, k, **kw), density(), rng)

    for _ in range(draw(st.integers(1, 3))):
        cin = x.shape[1]  # type: ignore[index]
        op = draw(st.sampled_from(["conv", "grouped", "residual", "concat", "pool", "relu"]))
        if op == "conv":
            k = draw(st.integers(1, 3))
            pad = draw(st.integers(0, 1))
            dil = draw(st.integers(1, 2))
            stride = draw(st.integers(1, 2))
            if x.shape[2] + 2 * pad - dil * (k - 1) - 1 < 0:  # type: ignore[index]
                continue
            x = conv(x, draw(st.integers(1, 3)), k, stride=stride, pad=pad, dilation=dil)
        elif op == "grouped":
            x = conv(x, 2 * cin, 3, pad=1, groups=cin)
        elif op == "residual":
            x = b.add(conv(x, cin, 3, pad=1), x)
        elif op == "concat":
            x = b.concat(conv(x, 1, 1), conv(x, 1, 3, pad=1))
        elif op == "pool" and x.shape[2] >= 2:  # type: ignore[index]
            x = b.pool(x, draw(st.sampled_from(["max", "avg"])), 2, draw(st.integers(1, 2)))
        else:
            x = b.relu(x)
    head = draw(st.sampled_from(["none", "flatten", "global"]))
    if head == "flatten":
        x = sparse(b, b.linear(b.flatten(x), draw(st.integers(1, 3)), transposed=draw(st.booleans())), density(), rng)
    elif head == "global":
        x = sparse(b, b.linear(b.flatten(b.global_pool(x)), draw(st.integers(1, 3)), transposed=draw(st.booleans())), density(), rng)
    return b.build(x)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(random_dags())
def test_random_dags_match_brute_force(g: Graph) -> None:
    check_against_brute_force(g)


def test_attention_gate_rule_and_two_outputs() -> None:
    rng = np.random.RandomState(3)
    b = GraphBuilder()
    x = b.input((1, 3, 2))
    q = sparse(b, b.linear(x, 2), 0.6, rng)
    k = sparse(b, b.linear(x, 2, transposed=True), 0.6, rng)
    scores = b.matmul(q, b.transpose(k, [0, 2, 1]))
    v = sparse(b, b.linear(x, 3, transposed=True), 0.6, rng)
    att = b.matmul(b.relu(scores), v)
    g = b.build(sparse(b, b.linear(att, 2, transposed=True), 0.5, rng), q)
    check_against_brute_force(g)


def test_shared_weight_counts_once() -> None:
    b = GraphBuilder()
    shared = b.param("tied.weight", (3, 3))
    y = b.linear(b.linear(b.input((1, 3)), 3, weight=shared), 3, weight=shared)
    b.graph.set_mask(shared, np.random.RandomState(0).rand(3, 3) < 0.5)
    g = b.build(y)
    res = analyse(g)
    assert [row.param for row in res.layers] == [shared.name] and len(res.layers[0].nodes) == 2
    check_against_brute_force(g)


def test_dead_branch_is_not_effective() -> None:
    b = GraphBuilder()
    h = b.linear(b.input((1, 4)), 4)
    g = b.build(b.linear(h, 2))
    last = g.prunable_params()[1]
    g.set_mask(last, np.array([[1, 0, 0, 0], [1, 0, 0, 0]], bool))  # hidden units 1..3 lead nowhere
    res = analyse(g)
    first = res.layers[0]
    assert first.effective_params == 4 and first.effective_nodes == 1
    assert res.log_paths == pytest.approx(math.log(4 * 2))


def test_dpai_equals_mean_pool_count_on_a_chain() -> None:
    """On a chain the max-normalisation cancels: log P̃ = log of the mean-pooled ones-forward."""
    b, rng = GraphBuilder(), np.random.RandomState(1)
    x = sparse(b, b.conv(b.input((1, 2, 6, 6)), 3, 3, pad=1), 0.6, rng)
    x = b.pool(x, "avg", 2, 2)
    x = sparse(b, b.conv(x, 2, 3, pad=1), 0.6, rng)
    x = sparse(b, b.linear(b.flatten(b.global_pool(x)), 2), 0.8, rng)
    g = b.build(x)
    weight = defaultdict(lambda: 1.0)
    weight.update({n.outputs[0].name: 1 / 4 for n in g.nodes if n.kind is OpKind.POOL and not n.attrs["reduce"]})
    weight.update({n.outputs[0].name: 1 / 9 for n in g.nodes if n.kind is OpKind.POOL and n.attrs["reduce"]})
    edges = element_edges(g)
    mean_count: dict[Any, float] = defaultdict(float)
    for v in g.inputs:
        for idx in itertools.product(*[range(d) for d in v.shape]):  # type: ignore[union-attr]
            mean_count[(v.name, idx)] = 1.0
    order = {n.outputs[0].name: i for i, n in enumerate(g.nodes) if n.outputs}
    for src, dst, _ in sorted(edges, key=lambda e: order[e[1][0]]):
        mean_count[dst] += mean_count[src] * weight[dst[0]]
    total = sum(c for (name, _), c in mean_count.items() if name == g.outputs[0].name)
    res = analyse(g)
    assert res.log_paths_dpai == pytest.approx(math.log(total), rel=1e-12)
    assert res.log_paths > res.log_paths_dpai  # sum pooling counts every path once


def test_deep_chain_does_not_overflow() -> None:
    b = GraphBuilder()
    x = b.input((1, 64))
    for _ in range(200):
        x = b.linear(x, 64)
    res = analyse(b.build(x))
    assert math.isfinite(res.log_paths) and res.log_paths == pytest.approx(201 * math.log(64), rel=1e-12)
    assert res.log_paths_dpai == pytest.approx(res.log_paths, rel=1e-12)
    assert res.effective_params == 200 * 64 * 64


def test_opaque_node_is_refused_by_name() -> None:
    b = GraphBuilder()
    h = b.opaque([b.linear(b.input((1, 3)), 3)], (1, 3), "Weird")
    g = b.build(b.linear(h, 2))
    with pytest.raises(PaicError, match="'opaque1' is opaque \\(Weird\\)"):
        analyse(g)


def test_shortcuts_and_node_conventions_on_resnet20(examples_dir: Any) -> None:
    g = load_onnx_model(examples_dir / "resnet20.onnx")
    res = analyse(g)
    assert sorted(r.param for r in res.layers if r.shortcut) == ["blocks.3.shortcut.0.weight", "blocks.6.shortcut.0.weight"]
    # dense: every channel counts; DPaI = 794 output channels, NPB (algorithms.md §4.3) = 701
    assert (res.effective_nodes, res.total_nodes, res.effective_nodes_npb) == (794, 794, 701)
    assert res.effective_params == 270_896


def test_structural_shortcut_without_a_name() -> None:
    b = GraphBuilder()
    x = b.input((1, 2, 4, 4))
    main = b.conv(b.relu(b.conv(x, 4, 3, pad=1)), 4, 3, pad=1)
    proj = b.batch_norm(b.conv(x, 4, 1))
    g = b.build(b.add(main, proj))
    flags = {r.param: r.shortcut for r in analyse(g).layers}
    assert [name for name, s in flags.items() if s] == ["conv3.weight"]


def test_fused_attention_agrees_with_the_decomposed_onnx_graph(examples_dir: Any, tmp_path: Any) -> None:
    """Same masks, two lowerings of tiny_vit (fx: one attention node; ONNX: linear+matmul): same answers."""
    pytest.importorskip("pai_compiler.frontends.torch.spec")
    from pai_compiler.api import load_model

    spec = tmp_path / "models.py"
    spec.write_text("from pai_compiler.lab import zoo\n\ndef tiny_vit():\n    return zoo.build('tiny_vit')\n")
    fused = load_model(f"{spec}:tiny_vit", input_shape="1,3,32,32", frontend="fx")
    onnx_graph = load_onnx_model(examples_dir / "tiny_vit.onnx")
    assert any(n.kind is OpKind.ATTENTION for n in fused.nodes)
    rng = np.random.RandomState(0)
    masks = {p.origin: rng.rand(*p.shape) < 0.03 for p in onnx_graph.prunable_params()}
    for g in (onnx_graph, fused):
        for p in g.prunable_params():
            g.set_mask(p, masks[p.origin])
    a, b = analyse(onnx_graph), analyse(fused)
    assert a.log_paths == pytest.approx(b.log_paths, abs=1e-9) and a.log_paths_dpai == pytest.approx(b.log_paths_dpai, abs=1e-9)
    assert (a.effective_params, a.effective_nodes, a.effective_kernels, a.effective_nodes_npb) == (
        b.effective_params, b.effective_nodes, b.effective_kernels, b.effective_nodes_npb)
    assert a.effective_params < sum(p.kept() for p in onnx_graph.prunable_params())  # dead ends exist at 97%
