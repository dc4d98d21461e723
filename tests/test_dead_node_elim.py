"""dead-node-elim + compact backends: the compact model computes the masked model's function.

Differential: IR interpreter (masked graph vs compacted graph) and onnxruntime (masked ONNX
vs compact ONNX) on every example model at several sparsities and methods, and on random
ONNX graphs (hypothesis) with residual adds, concat, split, grouped/depthwise convs, BN with
nonzero statistics and biases (so constant channels must be folded) and flatten->linear.
MAC rule: per conv/linear layer, the compact model's *nonzero* MACs equal the masked model's
*effective* MACs when channel-level and element-level reachability agree (CNNs with a global
pooling head); they are an upper bound otherwise (LayerNorm-pinned ViT channels, spatial
flatten heads). The effective MACs themselves never change.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from pai_compiler.api import optimize
from pai_compiler.audit import audit_graph
from pai_compiler.backends.onnx_compact import write_compact_onnx
from pai_compiler.backends.onnx_masked import write_masked_onnx
from pai_compiler.backends.torch_compact import compact_module
from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.interp import Interpreter
from pai_compiler.ir import Graph, Node, OpKind
from pai_compiler.ort import session
from pai_compiler.pass_infra import Fixpoint, PassManager, Sequential
from pai_compiler.passes.analysis.coupling import channel_spaces
from pai_compiler.errors import PassError
from pai_compiler.passes.analysis.sparsity import SparsityPass
from pai_compiler.passes.transform.dead_node_elim import CompactReport, DeadNodeElimPass, FoldRecord, LayerChange, compact_report_of
from pai_compiler.passes.transform.dead_node_elim import transform as dne_transform
from pai_compiler.registry import available_passes

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "models"


def compact(graph: Graph, align: int = 1) -> tuple[Graph, CompactReport]:
    out = graph.clone()
    version = out.version
    report = compact_report_of(PassManager([DeadNodeElimPass(align=align)]).run(out))
    out.verify()
    assert report.applied == (out.version != version)
    return out, report


def close(got: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(ref).max())))


def run_ir(graph: Graph, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return Interpreter(graph).run([torch.from_numpy(x)]).outputs[0].numpy()


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    sess = session(path, threads=1)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def layer_macs(graph: Graph) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in audit_graph(graph)["layers"]}


def check_all(graph: Graph, src: Path, tmp: Path, x: np.ndarray, *, exact_macs: bool, align: int = 1) -> tuple[Graph, CompactReport]:
    """Masked vs compact via IR and ORT, MAC rule, idempotence; returns the compact graph and its report."""
    small, report = compact(graph, align)
    close(run_ir(small, x), run_ir(graph, x))
    write_masked_onnx(graph, src, tmp / "masked.onnx")
    write_compact_onnx(small, src, tmp / "compact.onnx", report)
    close(run_ort(tmp / "compact.onnx", x), run_ort(tmp / "masked.onnx", x))
    before, after = layer_macs(graph), layer_macs(small)
    for name, row in before.items():
        assert after[name]["macs_effective"] == row["macs_effective"], name  # removing dead channels keeps every path
        if exact_macs:
            assert after[name]["macs_nonzero"] == row["macs_effective"], name
        else:
            assert after[name]["macs_nonzero"] >= row["macs_effective"], name
    version = small.version
    records = PassManager([DeadNodeElimPass(align=align)]).run(small)
    assert not records[0].modified and small.version == version, "dead-node-elim must be idempotent"
    assert not records[0].report.applied
    return small, report


# ---- example models ---------------------------------------------------------------------------
def _methods() -> list[tuple[str, float]]:
    cases = [(m, s) for s in (0.9, 0.99, 0.9968) for m in ("random", "magnitude")]
    names = set(available_passes())
    if "dpai" in names:
        cases.append(("dpai{steps=20}", 0.99))
    if "synflow" in names:
        cases.append(("synflow{scope=layer,iterations=5}", 0.99))
    return cases


@pytest.mark.parametrize("model", ["resnet20", "vgg_small", "tiny_vit"])
@pytest.mark.parametrize("method,sparsity", _methods())
def test_example_models_compact_equals_masked(tmp_path: Path, model: str, method: str, sparsity: float) -> None:
    src = EXAMPLES / f"{model}.onnx"
    criterion = method if "{" in method else f"{method}{{scope=layer}}"
    graph = optimize(src, pipeline=f"erk{{sparsity={sparsity}}},{criterion}").graph
    x = np.random.RandomState(0).randn(3, 3, 32, 32).astype(np.float32)
    _, report = check_all(graph, src, tmp_path, x, exact_macs=model != "tiny_vit")
    if sparsity >= 0.99 and model != "tiny_vit":
        outs = [layer.channels_out for layer in report.layers if layer.channels_out is not None]
        assert report.applied and sum(after for _, after in outs) < sum(before for before, _ in outs)


@pytest.mark.parametrize("name", ["light_squeezenet", "light_inception_v1"])
def test_onnx_zoo_models_compact(tmp_path: Path, name: str) -> None:
    """Real exported models: concat-heavy blocks, old IR versions listing initializers as inputs,
    a weight computed by a Reshape (no initializer to rewrite: a new one is written)."""
    src = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"{name}.onnx"
    graph = optimize(src, sparsity=0.999, method="random").graph
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    small, report = compact(graph)
    assert sum(p.numel for p in small.prunable_params()) < 0.1 * sum(p.numel for p in graph.prunable_params())
    write_masked_onnx(graph, src, tmp_path / "masked.onnx")
    write_compact_onnx(small, src, tmp_path / "compact.onnx", report)
    close(run_ort(tmp_path / "compact.onnx", x), run_ort(tmp_path / "masked.onnx", x))


# ---- random ONNX graphs -----------------------------------------------------------------------
class _Builder:
    """Builds a small random ONNX CNN: every op's channels are tracked for shape bookkeeping."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def init(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        out = self.name(op.lower() + "_out")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int, groups: int = 1, bias: bool | None = None) -> str:
        w = self.rng.standard_normal((cout, cin // groups, k, k)).astype(np.float32) * 0.5
        ins = [x, self.init("w", w)]
        if bias if bias is not None else self.rng.random() < 0.5:
            ins.append(self.init("b", self.rng.standard_normal(cout).astype(np.float32)))
        return self.node("Conv", ins, kernel_shape=[k, k], pads=[k // 2] * 4, group=groups)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        ins = [x, self.init("g", r.uniform(0.5, 1.5, c)), self.init("beta", r.standard_normal(c)),
               self.init("mean", r.standard_normal(c)), self.init("var", r.uniform(0.5, 2.0, c))]
        self.inits[-4:] = [numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name) for t in self.inits[-4:]]
        return self.node("BatchNormalization", ins, epsilon=1e-5)

    def unit(self, x: str, cin: int, cout: int, k: int, groups: int = 1) -> str:
        y = self.conv(x, cin, cout, k, groups)
        if self.rng.random() < 0.8:
            y = self.bn(y, cout)
        return self.node("Relu", [y]) if self.rng.random() < 0.8 else self.node("Sigmoid", [y])


def random_onnx(blocks: list[str], head: str, seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    b = _Builder(rng)
    c, hw = int(rng.choice([4, 6])), 8
    x = b.unit("input", 3, c, 3)
    for kind in blocks:
        if kind == "conv":
            out = int(rng.choice([4, 6, 8]))
            x, c = b.unit(x, c, out, int(rng.choice([1, 3]))), out
        elif kind == "grouped" and c % 2 == 0:
            out = 2 * int(rng.choice([2, 3]))
            x, c = b.unit(x, c, out, 3, groups=2), out
        elif kind == "depthwise":
            x = b.unit(x, c, c, 3, groups=c)
        elif kind == "residual":
            y = b.bn(b.conv(b.unit(x, c, c, 3), c, c, 3), c)
            x = b.node("Relu", [b.node("Add", [y, x])])
        elif kind == "projection":
            out = int(rng.choice([4, 8]))
            y = b.bn(b.conv(x, c, out, 3), out)
            s = b.bn(b.conv(x, c, out, 1, bias=False), out)
            x, c = b.node("Relu", [b.node("Add", [y, s])]), out
        elif kind == "concat":
            c1, c2 = int(rng.choice([2, 3])), int(rng.choice([2, 4]))
            x, c = b.node("Concat", [b.unit(x, c, c1, 3), b.unit(x, c, c2, 1)], axis=1), c1 + c2
        elif kind == "split" and c >= 3:
            first = int(rng.integers(1, c))
            node = helper.make_node("Split", [x, b.init("sizes", np.array([first, c - first], dtype=np.int64))],
                                    [b.name("s"), b.name("s")], name=b.name("Split"), axis=1)
            b.nodes.append(node)
            out = int(rng.choice([4, 6]))
            x, c = b.node("Add", [b.unit(node.output[0], first, out, 3), b.unit(node.output[1], c - first, out, 1)]), out
        elif kind == "scale":
            x = b.node("Mul", [x, b.init("s", rng.uniform(0.5, 2.0, (1, c, 1, 1)).astype(np.float32))])
        elif kind == "pool" and hw >= 4:
            x, hw = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2]), hw // 2
    classes = 5
    if head == "gap":
        f = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
        feat = c
    else:
        f = b.node("Flatten", [x], axis=1)
        feat = c * hw * hw
    hidden = int(rng.choice([6, 10]))
    w1 = rng.standard_normal((hidden, feat)).astype(np.float32) * 0.3
    trans_b = int(rng.integers(0, 2))  # Gemm B stored (out, in) with transB=1, else (in, out)
    gemm_in = [f, b.init("fc1", w1 if trans_b else w1.T.copy())]
    if rng.random() < 0.5:
        gemm_in.append(b.init("fc1b", rng.standard_normal(hidden).astype(np.float32)))
    h = b.node("Relu", [b.node("Gemm", gemm_in, transB=trans_b, alpha=float(rng.choice([1.0, 0.5])))])
    w2 = rng.standard_normal((hidden, classes)).astype(np.float32) * 0.3
    if rng.random() < 0.5:
        y = b.node("MatMul", [h, b.init("fc2", w2)])
        b.nodes.append(helper.make_node("Add", [y, b.init("fc2b", rng.standard_normal(classes).astype(np.float32))], ["output"], name="out_add"))
    else:  # no bias: a folded constant needs a new Add after the MatMul
        b.nodes.append(helper.make_node("MatMul", [h, b.init("fc2", w2)], ["output"], name="out_matmul"))
    graph = helper.make_graph(b.nodes, "random", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", classes])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def random_masks(graph: Graph, seed: int, whole_kernels: bool = False) -> None:
    """Random per-layer density plus whole rows/columns pruned, so dead channels are common.

    ``whole_kernels``: each (out, in) kernel is kept or pruned whole, so every kept kernel's
    centre tap spreads reachability to all positions (channel level = element level).
    """
    rng = np.random.default_rng(seed)
    for p in graph.prunable_params():
        keep = rng.random(p.shape) < rng.choice([0.05, 0.2, 0.5, 1.0])
        if whole_kernels:
            oi = p.to_oi(keep)
            oi[...] = oi[(slice(None), slice(None)) + (0,) * (oi.ndim - 2)][(...,) + (None,) * (oi.ndim - 2)]
        oi = p.to_oi(keep)
        oi[rng.random(oi.shape[0]) < 0.3] = False
        if oi.ndim > 1:
            oi[:, rng.random(oi.shape[1]) < 0.2] = False
        graph.set_mask(p, keep)


BLOCKS = st.lists(st.sampled_from(["conv", "grouped", "depthwise", "residual", "projection", "concat", "split", "scale", "pool"]), min_size=1, max_size=5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(blocks=BLOCKS, head=st.sampled_from(["gap", "flatten"]), seed=st.integers(0, 2**31 - 1), align=st.sampled_from([1, 1, 4]),
       whole_kernels=st.booleans())
def test_random_graphs_compact_equals_masked(tmp_path: Path, blocks: list[str], head: str, seed: int, align: int, whole_kernels: bool) -> None:
    src = tmp_path / "random.onnx"
    onnx.save_model(random_onnx(blocks, head, seed), str(src))
    graph = load_onnx_model(src)
    random_masks(graph, seed, whole_kernels)
    x = np.random.default_rng(seed + 1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    # taps of a sparse kernel can make reachability partial over positions: then the channel-level
    # compaction keeps a few weights node-path calls dead (an upper bound, still exact in value)
    small, _ = check_all(graph, src, tmp_path, x, exact_macs=head == "gap" and whole_kernels, align=align)
    if align > 1:  # a layer width is a multiple of align unless it kept every channel
        for node in small.nodes:
            if node.kind in (OpKind.CONV, OpKind.LINEAR):
                new, old = node.outputs[0].shape[-1 if node.kind is OpKind.LINEAR else 1], graph.node(node.name).outputs[0].shape[-1 if node.kind is OpKind.LINEAR else 1]
                assert new % align == 0 or new == old, (node.name, new, old)


# ---- rules, by hand -----------------------------------------------------------------------------
def _graph(blocks: list[str], seed: int, tmp: Path, head: str = "gap") -> tuple[Graph, Path]:
    src = tmp / "m.onnx"
    onnx.save_model(random_onnx(blocks, head, seed), str(src))
    return load_onnx_model(src), src


def _constant_channel(tmp: Path) -> tuple[Graph, Node]:
    """A random CNN whose second conv's output channel 0 is masked: bias (or 0) -> BN -> act, a constant."""
    graph, _ = _graph(["conv"], 3, tmp)
    convs = [n for n in graph.nodes if n.kind is OpKind.CONV]
    w = convs[1].params["weight"]
    mask = np.ones(w.shape, dtype=bool)
    mask[0] = False
    graph.set_mask(w, mask)
    return graph, convs[1]


def test_constant_channel_is_folded_through_bn_and_relu(tmp_path: Path) -> None:
    graph, conv = _constant_channel(tmp_path)
    w = conv.params["weight"]
    small, report = compact(graph)
    assert small.node(conv.name).params["weight"].shape[0] == w.shape[0] - 1
    assert report.folds and all(f.constant_channels >= 1 for f in report.folds)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    close(run_ir(small, x), run_ir(graph, x))


def test_report_travels_through_sequential_and_fixpoint(tmp_path: Path) -> None:
    graph, _ = _constant_channel(tmp_path)
    _, direct = compact(graph)
    assert direct.applied and direct.removed_atoms >= 1
    nested = graph.clone()
    records = PassManager([Sequential((SparsityPass(), Fixpoint(DeadNodeElimPass(), max_rounds=2)))]).run(nested)
    assert [r.modified for r in records[0].children[1].children] == [True, False]  # the second round finds nothing
    assert compact_report_of(records) == direct


def test_dead_node_elim_rounds_that_do_not_converge_fail_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    graph, _ = _constant_channel(tmp_path)
    monkeypatch.setattr(dne_transform, "MAX_ROUNDS", 1)  # the one round allowed still removes channels
    with pytest.raises(PassError, match="dead-node-elim still changed after 1 rounds: no fixpoint"):
        PassManager([DeadNodeElimPass()]).run(graph)


def test_compact_reports_merge_in_run_order() -> None:
    first = CompactReport(
        layers=(LayerChange("w", "fc", "linear", (8, 4), (6, 4), (8, 6), (4, 4)),), folds=(FoldRecord("fc", 1, "bias"),),
        reshapes=("r",), weights_dropped=3, changed_params=("b", "w"), kept_dead_channels=(("pinned", 2),), removed_atoms=2, rounds=1)
    second = CompactReport(
        layers=(LayerChange("w", "fc", "linear", (6, 4), (5, 3), (6, 5), (4, 3)), LayerChange("v", "conv", "conv", (3, 3), (2, 3), (3, 2), None)),
        folds=(FoldRecord("conv", 2, "bias map"),), splits=("s",), changed_params=("a", "w"), kept_dead_channels=(("aligned", 1),),
        removed_atoms=1, rounds=1)
    merged = first.then(second)
    assert [layer.as_dict() for layer in merged.layers] == [
        {"name": "w", "node": "fc", "op": "linear", "shape_before": [8, 4], "shape_after": [5, 3], "out": [8, 5], "in": [4, 3]},
        {"name": "v", "node": "conv", "op": "conv", "shape_before": [3, 3], "shape_after": [2, 3], "out": [3, 2]},
    ]
    assert merged.folds == first.folds + second.folds and (merged.reshapes, merged.splits) == (("r",), ("s",))
    assert merged.changed_params == ("a", "b", "w") and merged.kept_dead_channels == (("aligned", 1),)  # the latest reasons
    assert (merged.weights_dropped, merged.removed_atoms, merged.rounds) == (3, 3, 2)
    assert first.then(CompactReport()) is first and CompactReport().then(second) is second and not CompactReport().applied


def _padded_chain(tmp: Path) -> tuple[Graph, Path]:
    """A model whose first conv feeds conv -> BN -> ReLU -> a padded 3x3 conv."""
    for seed in range(200):
        graph, src = _graph(["conv"], seed, tmp)
        convs = [n for n in graph.nodes if n.kind is OpKind.CONV]
        chain = [u.kind for u in (convs[0].outputs[0].uses[0], convs[0].outputs[0].uses[0].outputs[0].uses[0])]
        if chain == [OpKind.NORM, OpKind.POINTWISE] and convs[1].attrs["kernel_shape"] == [3, 3] and convs[1].attrs["pads"][0] == 1:
            return graph, src
    raise AssertionError("no seed gives the wanted chain")


def test_padded_consumer_gets_a_bias_map(tmp_path: Path) -> None:
    graph, src = _padded_chain(tmp_path)
    bn = next(n for n in graph.nodes if n.kind is OpKind.CONV).outputs[0].uses[0]
    model = onnx.load(str(src))
    for t in model.graph.initializer:
        if t.name == bn.params["bias"].origin:  # act(BN(constant)) clearly nonzero
            t.CopyFrom(numpy_helper.from_array(np.full(tuple(t.dims), 3.0, dtype=np.float32), t.name))
    onnx.save_model(model, str(src))
    graph = load_onnx_model(src)
    conv = next(n for n in graph.nodes if n.kind is OpKind.CONV)
    w = conv.params["weight"]
    mask = np.ones(w.shape, dtype=bool)
    mask[1] = False  # channel 1: a nonzero constant map
    graph.set_mask(w, mask)
    small, report = compact(graph)
    assert small.node(conv.name).params["weight"].shape[0] == w.shape[0] - 1
    assert "bias map" in {f.into for f in report.folds}  # a padded 3x3 conv of a constant varies at the borders
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    close(run_ir(small, x), run_ir(graph, x))
    write_compact_onnx(small, src, tmp_path / "c.onnx", report)
    write_masked_onnx(graph, src, tmp_path / "m.onnx")
    close(run_ort(tmp_path / "c.onnx", x), run_ort(tmp_path / "m.onnx", x))


def test_layernorm_channels_are_pinned() -> None:
    graph = load_onnx_model(EXAMPLES / "tiny_vit.onnx")
    cs = channel_spaces(graph)
    pinned = cs.pinned_roots()
    ln = next(n for n in graph.nodes if n.kind is OpKind.NORM and n.attrs["type"] == "layer")
    roots = cs.roots(cs.tracks[ln.inputs[0].name].atoms)
    assert all(int(r) in pinned for r in roots)
    mlp = next(n for n in graph.nodes if n.kind is OpKind.LINEAR and n.outputs[0].shape[-1] == 128)
    assert not any(int(r) in pinned for r in cs.roots(cs.tracks[mlp.outputs[0].name].atoms))


def test_grouped_conv_keeps_whole_groups(tmp_path: Path) -> None:
    graph, _ = _graph(["conv", "grouped", "conv"], 5, tmp_path)
    grouped = next(n for n in graph.nodes if n.kind is OpKind.CONV and n.attrs["groups"] == 2)
    w = grouped.params["weight"]
    mask = np.ones(w.shape, dtype=bool)
    mask[0] = False  # one output of group 0 dead, the rest of the group alive: the group stays
    graph.set_mask(w, mask)
    small, _ = compact(graph)
    g = small.node(grouped.name)
    assert g.params["weight"].shape[0] % g.attrs["groups"] == 0
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    close(run_ir(small, x), run_ir(graph, x))


# ---- torch module and CLI -----------------------------------------------------------------------
def test_torch_compact_module_matches_and_trains() -> None:
    graph = optimize(EXAMPLES / "resnet20.onnx", sparsity=0.99, method="random").graph
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = Interpreter(graph).run([x]).outputs[0]
    module = compact_module(compact(graph)[0])
    with torch.no_grad():
        close(module(x).numpy(), ref.numpy())
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    target = torch.randint(0, 10, (4,))
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(module(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, mask in module.export_masks().items():
        weight = module.tensors()[name]
        assert float(weight.detach()[mask == 0].abs().sum()) == 0.0


@pytest.mark.parametrize("name", ["resnet20", "tiny_vit"])
def test_torch_frontend_graph_compacts(name: str) -> None:
    """Graphs from torch.fx (fused attention nodes: pinned) compact exactly too."""
    from pai_compiler.lab import zoo
    from pai_compiler.frontends.torch.fx import lower_fx

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    graph = optimize(lower_fx(zoo.build(name).eval(), x), sparsity=0.99, method="random").graph
    small, _ = compact(graph)
    assert sum(p.numel for p in small.prunable_params()) < sum(p.numel for p in graph.prunable_params())
    with torch.no_grad():
        close(compact_module(small)(x).numpy(), Interpreter(graph).run([x]).outputs[0].numpy())


def test_cli_compact_and_optimize_compact(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pai_compiler.cli import app

    src = EXAMPLES / "vgg_small.onnx"
    runner = CliRunner()
    masked, direct, later = tmp_path / "masked.onnx", tmp_path / "direct.onnx", tmp_path / "later.onnx"
    res = runner.invoke(app, ["optimize", str(src), "-o", str(masked), "-s", "0.99", "-m", "magnitude", "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["optimize", str(src), "-o", str(direct), "-s", "0.99", "-m", "magnitude", "--compact", "--report", str(tmp_path / "o.json")])
    assert res.exit_code == 0, res.output
    assert "compact" in res.output and "→" in res.output
    res = runner.invoke(app, ["compact", str(masked), "-o", str(later), "--report", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["params_after"] < doc["params_before"] and doc["macs_compact"] < doc["macs_dense"]
    assert json.loads((tmp_path / "o.json").read_text())["compact"]["params_after"] == doc["params_after"]
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref = run_ort(masked, x)
    close(run_ort(direct, x), ref)
    close(run_ort(later, x), ref)
    assert later.stat().st_size < masked.stat().st_size
    piped = tmp_path / "piped.onnx"  # dead-node-elim in a pipeline: the compact model is written too
    res = runner.invoke(app, ["optimize", str(src), "-o", str(piped), "-q", "-p", "erk{sparsity=0.99},magnitude{scope=layer},dead-node-elim"])
    assert res.exit_code == 0, res.output
    close(run_ort(piped, x), ref)
    dims = lambda path: sorted(tuple(t.dims) for t in onnx.load(str(path)).graph.initializer)  # noqa: E731
    assert dims(piped) == dims(direct)
