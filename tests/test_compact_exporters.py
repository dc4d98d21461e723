"""Compaction on every exporter's output: the same net, exported differently, compacts the same.

Exporters de-duplicate equal constants (the legacy TorchScript exporter stores equal BN
statistics, zeros and biases once and reads them through Identity nodes): such a constant is
one copy per use, so it no longer pins the channels it touches, while a genuinely tied weight
stays a tie. Each case prunes whole conv output rows (the lowest-L1 60 % of every conv, a rule
that gives the same rows whatever the exporter, since BN folding scales rows uniformly at
init), compacts, and checks: onnxruntime outputs of compact vs masked model (max rel error
1e-5), a real parameter reduction, and the same per-layer channel counts for every exporter.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pai_compiler.api import compact_graph, optimize
from pai_compiler.audit import masks_from_zeros
from pai_compiler.backends.onnx_compact import write_compact_onnx
from pai_compiler.backends.onnx_masked import write_masked_onnx
from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.ir import Graph, OpKind
from pai_compiler.lab import zoo
from pai_compiler.ort import session
from pai_compiler.pass_infra import AnalysisManager
from pai_compiler.passes.analysis.flops import FlopsPass, evaluate
from pai_compiler.passes.transform.dead_node_elim import CompactReport

EXPORTERS = ["legacy-nofold", "legacy-fold", "dynamo"]


def export(module: torch.nn.Module, x: torch.Tensor, path: Path, exporter: str) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(module, (x,), str(path), dynamo=True, opset_version=18, verbose=False)
        else:
            torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17,
                              do_constant_folding=exporter == "legacy-fold")
    return path


def prune_rows(graph: Graph, fraction: float = 0.6) -> None:
    """Zero the lowest-L1 ``fraction`` of every conv's output rows (whole dead channels)."""
    for node in graph.nodes:
        if node.kind is not OpKind.CONV:
            continue
        w = node.params["weight"]
        norms = np.abs(w.data).reshape(w.shape[0], -1).sum(axis=1)
        dead = np.argsort(norms, kind="stable")[: int(fraction * w.shape[0])]
        mask = np.ones(w.shape, dtype=bool)
        mask[dead] = False
        graph.set_mask(w, mask)


def run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = session(path, threads=1)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def max_rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))


def compact_and_compare(src: Path, tmp: Path, x: np.ndarray, mark: Callable[[Graph], None] = prune_rows) -> tuple[Graph, Graph, CompactReport]:
    """(masked graph, compact graph, report) with ``mark`` setting the masks; asserts ORT(compact) == ORT(masked)."""
    graph = load_onnx_model(src)
    mark(graph)
    small = graph.clone()
    report = compact_graph(small)
    write_masked_onnx(graph, src, tmp / "masked.onnx")
    write_compact_onnx(small, src, tmp / "compact.onnx", report)
    onnx.checker.check_model(str(tmp / "compact.onnx"), full_check=True)
    assert max_rel_error(run(tmp / "compact.onnx", x), run(tmp / "masked.onnx", x)) <= 1e-5
    return graph, small, report


def params(graph: Graph) -> int:
    return sum(p.numel for p in graph.params())


@pytest.fixture(scope="module")
def resnet20_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    model = zoo.build("resnet20", num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    tmp = tmp_path_factory.mktemp("exports")
    return {e: export(model, x, tmp / f"{e}.onnx", e) for e in EXPORTERS}


def test_resnet20_every_exporter_compacts_the_same(resnet20_exports: dict[str, Path], tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    channels: dict[str, list[tuple[int, int]]] = {}
    for exporter, src in resnet20_exports.items():
        (tmp_path / exporter).mkdir()
        graph, small, report = compact_and_compare(src, tmp_path / exporter, x)
        assert params(small) < 0.6 * params(graph), exporter
        channels[exporter] = sorted(layer.channels_out for layer in report.layers if layer.op == "conv")  # type: ignore[misc]
        assert dict(report.kept_dead_channels).get("param", 0) == 0
    assert channels["legacy-nofold"] == channels["legacy-fold"] == channels["dynamo"]


def test_legacy_export_shares_constants_through_identity(resnet20_exports: dict[str, Path]) -> None:
    """The regression's premise: the legacy exporter does de-duplicate, and the IR splits the copies."""
    model = onnx.load(str(resnet20_exports["legacy-nofold"]))
    assert any(n.op_type == "Identity" for n in model.graph.node)
    graph = load_onnx_model(resnet20_exports["legacy-nofold"])
    copies = [p for p in graph.params() if p.per_use_copy]
    assert copies and all(not p.prunable for p in copies)
    assert len({p.storage for p in graph.params()}) == len(graph.params())


# ---- effective MACs (audit) vs the compact model's nonzero MACs ----------------------------
def macs(graph: Graph, *, effective: bool) -> tuple[int, dict[str, int]]:
    """Total MACs (effective or nonzero, batch 1) and the conv/linear nodes' own."""
    result = AnalysisManager(graph).get(FlopsPass(effective=effective))
    column = "effective" if effective else "nonzero"
    layers = {n.node: evaluate(getattr(n, column)) for n in result.nodes if n.kind in ("conv", "linear")}
    return evaluate(getattr(result, column)), layers


def assert_compact_macs_bound(graph: Graph) -> None:
    """flops' documented bound: compact nonzero MACs ≥ effective MACs, in total and per layer."""
    small = graph.clone()
    compact_graph(small)
    effective, effective_layers = macs(graph, effective=True)
    compact, compact_layers = macs(small, effective=False)
    assert compact >= effective
    for name, count in effective_layers.items():
        assert compact_layers[name] >= count, name
    nonzero, _ = macs(graph, effective=False)
    assert effective < nonzero  # the dead channels' norm/activation MACs are not effective


@pytest.mark.parametrize("model", ["resnet20", "vgg_small", "tiny_vit"])
def test_effective_macs_bound_example_models(examples_dir: Path, model: str) -> None:
    graph = optimize(examples_dir / f"{model}.onnx", pipeline="erk{sparsity=0.99},magnitude{scope=layer}").graph
    prune_rows(graph, fraction=0.5)  # dead channels on top of the unstructured masks
    for p in graph.prunable_params():
        if p.mask is not None and p.data.ndim == 4:
            graph.set_mask(p, p.mask & (np.abs(p.data) > np.quantile(np.abs(p.data), 0.5)))
    assert_compact_macs_bound(graph)


def test_effective_macs_bound_resnet50(tmp_path: Path) -> None:
    """The regression: ONNX ResNet-50 with dead channels compacted to fewer nonzero MACs than the
    audit's effective count, which counted dead channels' BN/ReLU/Add MACs as effective."""
    torch.manual_seed(0)
    src = export(zoo.build("resnet50", num_classes=10).eval(), torch.randn(1, 3, 32, 32), tmp_path / "r50.onnx", "legacy-fold")
    graph = load_onnx_model(src)
    prune_rows(graph, fraction=0.8)
    assert_compact_macs_bound(graph)


# ---- paic compact --explain ------------------------------------------------------------------
def split_channels_model(path: Path) -> Path:
    """Conv 4->8 whose first 4 output rows are zero (dead), then a Reshape mixing channels with positions."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    w[:4] = 0
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["y"], name="split_heads")]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 32])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([1, 4, 32], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_compact_explain_names_what_kept_dead_channels(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pai_compiler.cli import app

    src = split_channels_model(tmp_path / "m.onnx")
    graph = load_onnx_model(src)
    masks_from_zeros(graph)
    report = compact_graph(graph)
    assert not report.applied  # nothing could go: the report still says why
    assert dict(report.kept_dead_channels) == {"reshape splits or merges the channel dim": 4}
    assert [name for name, _ in report.kept_dead_sources] == ["reshape 'split_heads': reshape splits or merges the channel dim"]
    runner = CliRunner()
    res = runner.invoke(app, ["compact", str(src), "-o", str(tmp_path / "c.onnx"), "--explain"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "reshape splits or merges the channel dim" in res.output and "split_heads" in res.output
    res = runner.invoke(app, ["compact", str(src), "-o", str(tmp_path / "c2.onnx")], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "--explain" in res.output


# ---- channel shuffle, grouped and depthwise convs ---------------------------------------------
class ShuffleBlock(torch.nn.Module):
    """ShuffleNet-style: 1x1 conv, BN, ReLU, channel shuffle, depthwise 3x3, grouped 1x1, head."""

    def __init__(self, channels: int = 24, groups: int = 3) -> None:
        super().__init__()
        self.groups = groups
        self.stem = torch.nn.Conv2d(3, channels, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(channels)
        self.depthwise = torch.nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(channels)
        self.grouped = torch.nn.Conv2d(channels, 2 * channels, 1, groups=groups)
        self.fc = torch.nn.Linear(2 * channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.stem(x)))
        n, c, h, w = y.shape
        y = y.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)
        y = torch.relu(self.grouped(self.bn2(self.depthwise(y))))
        return self.fc(y.mean(dim=(2, 3)))


def randomize_bn(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("exporter", ["legacy-nofold", "dynamo"])
def test_channel_shuffle_depthwise_and_grouped_convs_compact(tmp_path: Path, exporter: str) -> None:
    torch.manual_seed(0)
    model = ShuffleBlock().eval()
    randomize_bn(model)
    with torch.no_grad():
        model.stem.weight[::2] = 0  # 12 of 24 stem channels dead: shuffled, then read by the depthwise conv
        model.grouped.weight[:16] = 0  # the first of 3 groups writes nothing
    src = export(model, torch.randn(1, 3, 8, 8), tmp_path / "shuffle.onnx", exporter)
    graph = load_onnx_model(src)
    assert not any(n.kind is OpKind.RESHAPE and n.attrs.get("op") == "transpose" for n in graph.nodes)  # fused
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    graph, small, report = compact_and_compare(src, tmp_path, x, mark=masks_from_zeros)
    ref = model(torch.from_numpy(x)).detach().numpy()
    assert max_rel_error(run(tmp_path / "compact.onnx", x), ref) <= 1e-5
    counts = {layer.param: (layer.channels_out, layer.channels_in) for layer in report.layers}
    # group 0 of the grouped conv writes nothing: it goes whole, with its 8 input channels, which
    # the shuffle maps back to 8 stem channels; the dead stem channels of groups 1 and 2 stay
    # (a group goes whole or not at all). Unfused, the shuffle would pin all 24.
    assert counts["stem.weight"][0] == (24, 16), counts
    assert counts["depthwise.weight"][0] == (24, 16), counts
    assert counts["grouped.weight"] == ((48, 32), (8, 8)), counts  # in: per group
    weights = lambda g: sum(p.numel for p in g.prunable_params())  # noqa: E731  (bias maps of padded convs add some)
    assert weights(small) < 0.7 * weights(graph)


# ---- transformer FFN neurons -------------------------------------------------------------------
def test_transformer_ffn_neurons_compact(examples_dir: Path, tmp_path: Path) -> None:
    """An FFN hidden neuron whose in-row (first linear) or out-column (second linear) is fully
    pruned goes: the first is a constant (folded into what follows), the second reaches nothing."""
    src = examples_dir / "tiny_vit.onnx"
    graph = load_onnx_model(src)
    rng = np.random.default_rng(0)
    expected: dict[str, int] = {}
    for node in graph.nodes:
        if node.kind is OpKind.LINEAR and node.name.endswith("mlp.0/MatMul"):
            up = node.params["weight"]
            down = node.outputs[0].uses[0]  # bias add, GELU, ... up to the second linear
            while down.kind is not OpKind.LINEAR:
                down = down.outputs[0].uses[0]
            w_down = down.params["weight"]
            hidden = up.shape[up.out_axis]
            rows, cols = rng.permutation(hidden)[:40], rng.permutation(hidden)[:40]
            up_mask, down_mask = np.ones(up.shape, bool), np.ones(w_down.shape, bool)
            up.to_oi(up_mask)[rows] = False
            w_down.to_oi(down_mask)[:, cols] = False
            graph.set_mask(up, up_mask)
            graph.set_mask(w_down, down_mask)
            expected[up.name] = hidden - len(set(rows.tolist()) | set(cols.tolist()))
    assert len(expected) == 2
    small = graph.clone()
    report = compact_graph(small)
    write_masked_onnx(graph, src, tmp_path / "masked.onnx")
    write_compact_onnx(small, src, tmp_path / "compact.onnx", report)
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert max_rel_error(run(tmp_path / "compact.onnx", x), run(tmp_path / "masked.onnx", x)) <= 1e-5
    after = {layer.param: layer.channels_out for layer in report.layers}
    for name, hidden in expected.items():
        assert after[name] == (128, hidden), name


# ---- attention heads -----------------------------------------------------------------------------
class Encoder(torch.nn.Module):
    """A post-norm transformer encoder layer written out (heads by reshape/transpose, as exported)."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(width, width) for _ in range(4))
        self.up, self.down = torch.nn.Linear(width, 2 * width), torch.nn.Linear(2 * width, width)
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape
        return t.reshape(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, w = x.shape
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim ** 0.5, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, s, w)
        x = self.norm1(x + self.o(y))
        return self.norm2(x + self.down(torch.nn.functional.gelu(self.up(x))))


@pytest.mark.parametrize("exporter", ["legacy-nofold", "dynamo"])
def test_attention_heads_compact(tmp_path: Path, exporter: str) -> None:
    """Head 1: its output-projection columns are pruned (reaches nothing). Head 3: its Q, K and V
    rows are pruned (a constant, folded into the output projection's bias). Both go whole."""
    torch.manual_seed(0)
    model = Encoder().eval()
    with torch.no_grad():
        model.o.weight[:, 8:16] = 0
        for proj in (model.q, model.k, model.v):
            proj.weight[24:32] = 0
    src = export(model, torch.randn(1, 6, 32), tmp_path / "encoder.onnx", exporter)
    x = np.random.default_rng(1).standard_normal((1, 6, 32)).astype(np.float32)
    _, _, report = compact_and_compare(src, tmp_path, x, mark=masks_from_zeros)
    assert max_rel_error(run(tmp_path / "compact.onnx", x), model(torch.from_numpy(x)).detach().numpy()) <= 1e-5
    out = {layer.param: layer.channels_out for layer in report.layers}
    into = {layer.param: layer.channels_in for layer in report.layers}
    projections = [name for name, counts in out.items() if counts == (32, 16)]
    assert len(projections) == 3, out  # q, k and v lost two whole heads
    assert sorted(c for c in into.values() if c is not None and c[0] == 32 and c[1] != 32) == [(32, 16)], into  # o


def test_dynamo_dynamic_batch_flatten_with_allowzero_compacts(tmp_path: Path) -> None:
    """dynamo flattens (N, C, 1, 1) with Reshape(allowzero=1) to a shape whose N is symbolic: the new
    shape copies N with 0, which needs allowzero=0 (the same meaning without a literal 0). Before:
    "Reshape ... has allowzero=1 and a symbolic dim" (HF RegNet, dynamo export with dynamic batch)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(16, 4)).eval()
    src = tmp_path / "dyn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), str(src), dynamo=True, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=2)},))
    assert [a.i for n in onnx.load(src).graph.node if n.op_type == "Reshape" for a in n.attribute if a.name == "allowzero"] == [1]
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    graph, small, _ = compact_and_compare(src, tmp_path, x)
    assert params(small) < params(graph)
    assert run(tmp_path / "compact.onnx", x).shape == (3, 4)


def test_constant_read_at_two_inputs_of_one_node_compacts(tmp_path: Path) -> None:
    """Fresh BatchNorms as the dynamo exporter writes LeViT's: one initializer is both scale and var
    (ones), another both bias and mean (zeros), and every BN of the width reads the pair: each input
    of each node gets its own copy (the checker used to refuse the compact model: 8 vs 4 channels)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), name) for name, a in (
        ("w1", rng.standard_normal((8, 3, 3, 3))), ("w2", rng.standard_normal((8, 8, 3, 3))), ("fc", rng.standard_normal((8 * 36, 4))),
        ("ones", np.ones(8)), ("zeros", np.zeros(8)))]
    nodes = []
    for i, w in enumerate(("w1", "w2")):
        x = "x" if i == 0 else f"r{i - 1}"
        nodes += [helper.make_node("Conv", [x, w], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [f"c{i}", "ones", "zeros", "zeros", "ones"], [f"b{i}"]),
                  helper.make_node("Relu", [f"b{i}"], [f"r{i}"])]
    nodes += [helper.make_node("Flatten", ["r1"], ["f"]), helper.make_node("MatMul", ["f", "fc"], ["y"])]
    graph = helper.make_graph(nodes, "shared_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    src = tmp_path / "shared_bn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    _, small, _ = compact_and_compare(src, tmp_path, rng.standard_normal((1, 3, 6, 6)).astype(np.float32))
    assert [p.shape[0] for p in small.prunable_params()][:2] == [4, 4]  # 60 % of each conv's rows gone
