"""ConvTranspose as a weighted layer: ONNX (both exporters, hand-built attribute cases) and torch
routes against torch and onnxruntime, paths and effective weights against brute-force enumeration,
MACs against a hand count and torch's FlopCounterMode, every criterion, the masked ONNX and the
compact model against the IR's masked forward, and the clean refusals (DPaI channel mode, NPB)."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from pai_compiler.api import compact_graph, optimize, save_compact, save_model
from pai_compiler.audit import audit_graph
from pai_compiler.errors import PaicError
from pai_compiler.frontends.onnx import load_onnx_model
from pai_compiler.frontends.torch.spec import lower_module
from pai_compiler.interp import Interpreter
from pai_compiler.ir import Graph, GraphBuilder, Node, OpKind, parse, to_text
from pai_compiler.pass_infra import AnalysisManager
from pai_compiler.passes.analysis.flops import FlopsPass

_CPU = ["CPUExecutionProvider"]


class EncDec(nn.Module):
    """Conv(3->8, /2) -> ReLU -> ConvTranspose2d(8->6, x2, output_padding 1, groups 2) -> ReLU -> 1x1 Conv(6->2)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dec = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.dec(torch.relu(self.enc(x)))))


def _x(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _export(path: Path, exporter: str) -> Path:
    model = EncDec().eval()
    if exporter == "torchscript":
        torch.onnx.export(model, (_x(),), str(path), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    else:
        torch.onnx.export(model, (_x(),), str(path), dynamo=True, verbose=False)
    return path


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=_CPU)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _real(graph: Graph, *xs: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(Interpreter(graph, mode="real").run(list(xs)).outputs)


def _deconv(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if n.kind is OpKind.CONV_TRANSPOSE]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_onnx_exports_match_torch_and_onnxruntime(tmp_path: Path, exporter: str) -> None:
    source = _export(tmp_path / "m.onnx", exporter)
    graph = load_onnx_model(source)
    (node,) = _deconv(graph)
    assert node.params["weight"].shape == (8, 3, 3, 3) and node.outputs[0].shape[1:] == (6, 8, 8)
    assert not any(n.kind is OpKind.OPAQUE for n in graph.nodes)
    x = _x()
    (got,) = _real(graph, x)
    np.testing.assert_allclose(got.numpy(), EncDec().eval()(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.numpy(), _ort(source, x.numpy()), rtol=1e-5, atol=1e-5)


class _Shapes(nn.Module):
    """1-d, 3-d (grouped, dilated, anisotropic stride), ``output_size`` and the functional form."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.d1 = nn.ConvTranspose1d(4, 4, 3, stride=2, padding=1, output_padding=1)
        self.d3 = nn.ConvTranspose3d(2, 4, 2, stride=(1, 2, 2), dilation=2, groups=2)
        self.d2 = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1)
        self.w = nn.Parameter(torch.randn(2, 3, 2, 2))

    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.d1(a), self.d3(b), F.conv_transpose2d(self.d2(c, output_size=[10, 10]), self.w, stride=2, dilation=1)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_torch_routes_match_the_module(frontend: str) -> None:
    model = _Shapes().eval()
    args = (torch.randn(2, 4, 7), torch.randn(2, 2, 3, 4, 4), torch.randn(2, 4, 5, 5))
    graph = lower_module(model, args, frontend)
    assert len(_deconv(graph)) == 4 and not any(n.kind is OpKind.OPAQUE for n in graph.nodes)
    for got, want in zip(_real(graph, *args), model(*args)):
        np.testing.assert_allclose(got.numpy(), want.detach().numpy(), rtol=1e-5, atol=1e-5)


ONNX_CASES = [
    ({"strides": [2, 3], "pads": [0, 1, 2, 1], "output_padding": [1, 0], "dilations": [1, 2]}, (3, 3)),
    ({"strides": [2, 2], "output_shape": [10, 12]}, (3, 3)),
    ({"strides": [2, 2], "output_shape": [10, 12], "output_padding": [1, 1]}, (4, 4)),
    ({"strides": [2, 2], "auto_pad": "SAME_UPPER"}, (3, 3)),
    ({"strides": [2, 2], "auto_pad": "SAME_LOWER"}, (3, 3)),
    ({"strides": [2, 2], "auto_pad": "VALID"}, (3, 3)),
    ({"strides": [3], "pads": [2, 0]}, (4,)),
    ({"strides": [1, 2, 2], "pads": [1, 0, 0, 0, 1, 1], "output_padding": [0, 1, 1]}, (2, 3, 3)),
]


def _onnx_deconv(path: Path, attrs: dict[str, object], kernel: tuple[int, ...], spatial: tuple[int, ...]) -> Path:
    rng = np.random.default_rng(len(kernel))
    w = rng.standard_normal((4, 3, *kernel)).astype(np.float32)  # groups 2: out = 6
    b = rng.standard_normal(6).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], group=2, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, *spatial])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("attrs,kernel", ONNX_CASES, ids=lambda c: str(c))
def test_onnx_attributes_match_onnxruntime(tmp_path: Path, attrs: dict[str, object], kernel: tuple[int, ...]) -> None:
    spatial = (5, 6, 4)[: len(kernel)]
    source = _onnx_deconv(tmp_path / "d.onnx", attrs, kernel, spatial)
    x = np.random.default_rng(3).standard_normal((2, 4, *spatial)).astype(np.float32)
    graph = load_onnx_model(source)
    (got,) = _real(graph, torch.from_numpy(x))
    want = _ort(source, x)
    assert tuple(_deconv(graph)[0].outputs[0].shape) == want.shape
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_unsupported_attributes_refuse_in_one_line(tmp_path: Path) -> None:
    source = _onnx_deconv(tmp_path / "d.onnx", {"strides": [2, 2], "output_shape": [20, 20]}, (3, 3), (5, 6))
    with pytest.raises(PaicError, match=r"node .*ConvTranspose output size 20 exceeds .*re-export with explicit pads") as info:
        load_onnx_model(source)
    assert "\n" not in str(info.value)


DECODER_TEXT = """graph decoder {
  %x: float32[1,4,3,3] = input()
  %deconv1: float32[1,6,6,6] = conv_transpose(%x) {dilations=[1,1], groups=2, kernel_shape=[3,3], output_padding=[1,1], pads=[1,1,1,1], strides=[2,2]} [weight: deconv1.weight[4, 3, 3, 3] kept 108/108]
  output(%deconv1)
}
"""


def test_builder_prints_and_parses_the_golden_text() -> None:
    b = GraphBuilder("decoder")
    g = b.build(b.conv_transpose(b.input((1, 4, 3, 3)), 6, 3, stride=2, pad=1, output_padding=1, groups=2))
    assert to_text(g) == DECODER_TEXT
    parsed = parse(DECODER_TEXT)
    weight = parsed.node("deconv1").params["weight"]
    assert to_text(parsed) == DECODER_TEXT and (weight.out_axis, weight.in_axis) == (1, 0)
    x = torch.randn(1, 4, 3, 3)
    want = F.conv_transpose2d(x, torch.from_numpy(g.node("deconv1").params["weight"].data), stride=2, padding=1, output_padding=1, groups=2)
    np.testing.assert_allclose(_real(g, x)[0].numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


# ---- paths and effective weights against brute force -------------------------------------------------

def _two_deconvs(path: Path) -> tuple[Path, list[tuple[np.ndarray, dict[str, int]]]]:
    """x (1, 4, 2, 3) -> ConvTranspose(4->4, k3, s2, p1, op1, groups 2) -> ConvTranspose(4->2, k2, s1, p(1,0,0,1))."""
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((4, 2, 3, 3)).astype(np.float32) * (rng.random((4, 2, 3, 3)) < 0.4)
    w2 = rng.standard_normal((4, 2, 2, 2)).astype(np.float32) * (rng.random((4, 2, 2, 2)) < 0.5)
    nodes = [helper.make_node("ConvTranspose", ["x", "w1"], ["h"], group=2, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
             helper.make_node("ConvTranspose", ["h", "w2"], ["y"], pads=[1, 0, 0, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path, [(w1, {"groups": 2, "stride": 2, "pb_h": 1, "pb_w": 1, "out_h": 4, "out_w": 6}),
                  (w2, {"groups": 1, "stride": 1, "pb_h": 1, "pb_w": 0, "out_h": 4, "out_w": 6})]


def _unrolled(w: np.ndarray, spec: dict[str, int], in_hw: tuple[int, int]) -> tuple[np.ndarray, dict[tuple[int, ...], list[tuple[int, int]]]]:
    """The layer as a 0/1 count matrix (out elements x in elements), element by element, and which
    (out, in) entries each kept weight lies on."""
    c_in, per_out = w.shape[:2]
    per_in, (h_in, w_in), s = c_in // spec["groups"], in_hw, spec["stride"]
    out_n, in_n = per_out * spec["groups"] * spec["out_h"] * spec["out_w"], c_in * h_in * w_in
    matrix = np.zeros((out_n, in_n), dtype=np.int64)
    uses: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for ci, j, kh, kw, h, x in itertools.product(range(c_in), range(per_out), range(w.shape[2]), range(w.shape[3]), range(h_in), range(w_in)):
        oh, ow = h * s - spec["pb_h"] + kh, x * s - spec["pb_w"] + kw
        if w[ci, j, kh, kw] == 0 or not (0 <= oh < spec["out_h"] and 0 <= ow < spec["out_w"]):
            continue
        co = (ci // per_in) * per_out + j
        row, col = (co * spec["out_h"] + oh) * spec["out_w"] + ow, (ci * h_in + h) * w_in + x
        matrix[row, col] += 1
        uses.setdefault((ci, j, kh, kw), []).append((row, col))
    return matrix, uses


def test_paths_and_effective_weights_equal_brute_force(tmp_path: Path) -> None:
    source, layers = _two_deconvs(tmp_path / "p.onnx")
    (a1, uses1), (a2, uses2) = _unrolled(*layers[0], (2, 3)), _unrolled(*layers[1], (4, 6))
    count = int(np.ones(a2.shape[0]) @ a2 @ a1 @ np.ones(a1.shape[1]))
    into = a1 @ np.ones(a1.shape[1]) > 0  # h elements reached from x
    onward = np.ones(a2.shape[0]) @ a2 > 0  # h elements that reach y
    effective = sum(any(onward[r] for r, _ in rc) for rc in uses1.values()) + sum(any(into[c] for _, c in rc) for rc in uses2.values())
    graph = load_onnx_model(source)
    totals = audit_graph(graph)["totals"]
    assert count > 0 and totals["log_paths"] == pytest.approx(np.log(count), abs=1e-9)
    assert totals["effective_params"] == effective
    assert totals["total_nodes"] == 4 + 2


# ---- MACs -----------------------------------------------------------------------------------------

def test_macs_equal_a_hand_count_and_flop_counter(tmp_path: Path) -> None:
    graph = optimize(load_onnx_model(_export(tmp_path / "m.onnx", "torchscript")), sparsity=0.7, method="magnitude").graph
    (node,) = _deconv(graph)
    w = node.params["weight"]
    macs = AnalysisManager(graph).get(FlopsPass()).node(node.name)
    sites = 1 * 4 * 4  # N x input pixels
    assert macs.dense == sites * 8 * (6 // 2) * 9 == sites * w.numel
    assert macs.nonzero == sites * w.kept()
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        EncDec().eval().dec(torch.randn(1, 8, 4, 4))
    assert counter.get_total_flops() == 2 * macs.dense
    from pai_compiler.passes.analysis.node_path import NodePathPass

    live = NodePathPass().run(graph, AnalysisManager(graph)).layer(w.name).effective_params
    assert macs.effective == sites * live <= macs.nonzero


# ---- criteria, writers, compaction -----------------------------------------------------------------

CRITERIA = [("magnitude", {}), ("synflow", {}), ("snip", {"data": "random"}), ("grasp", {"data": "random"}),
            ("dpai-ref", {"pipeline": "erk{sparsity=0.6},dpai{paths=ref,steps=5}"})]


@pytest.mark.parametrize("route", ["onnx", "fx"])
@pytest.mark.parametrize("method,extra", CRITERIA, ids=[c[0] for c in CRITERIA])
def test_every_criterion_runs(tmp_path: Path, route: str, method: str, extra: dict[str, object]) -> None:
    graph = load_onnx_model(_export(tmp_path / "m.onnx", "torchscript")) if route == "onnx" else lower_module(EncDec().eval(), (_x(),), "fx")
    kwargs = dict(extra) if "pipeline" in extra else {"sparsity": 0.6, "method": method, **extra}
    result = optimize(graph, **kwargs)  # type: ignore[arg-type]
    (node,) = _deconv(result.graph)
    mask = node.params["weight"].mask
    assert mask is not None and 0.2 < mask.mean() < 0.8, (method, None if mask is None else mask.mean())


def test_npb_refuses_in_one_line(tmp_path: Path) -> None:
    match = r"npb: node .* \(conv_transpose\): NPB has no program for transposed convs; prune with"
    with pytest.raises(PaicError, match=match) as info:
        optimize(load_onnx_model(_export(tmp_path / "m.onnx", "torchscript")), pipeline="erk{sparsity=0.6},npb")
    assert "\n" not in str(info.value)


def test_default_dpai_runs_per_pixel_and_says_so(tmp_path: Path) -> None:
    """DPaI's default channel mode cannot represent a transposed conv: the run takes paths=ref, with a warning,
    and gives the masks dpai{paths=ref} gives."""
    graph = load_onnx_model(_export(tmp_path / "m.onnx", "torchscript"))
    default = optimize(graph.clone(), pipeline="erk{sparsity=0.6},dpai{steps=5}")
    assert any("running dpai{paths=ref}" in w for w in default.warnings)
    explicit = optimize(graph, pipeline="erk{sparsity=0.6},dpai{paths=ref,steps=5}")
    for a, b in zip(default.graph.prunable_params(), explicit.graph.prunable_params()):
        assert np.array_equal(a.mask, b.mask)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_masked_onnx_equals_the_ir_masked_forward(tmp_path: Path, exporter: str) -> None:
    source = _export(tmp_path / "m.onnx", exporter)
    result = optimize(load_onnx_model(source), sparsity=0.8, method="synflow")
    save_model(result, source, tmp_path / "pruned.onnx")
    x = _x()
    (want,) = _real(result.graph, x)
    np.testing.assert_allclose(_ort(tmp_path / "pruned.onnx", x.numpy()), want.numpy(), rtol=1e-5, atol=1e-5)
    (node,) = _deconv(result.graph)
    stored = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "pruned.onnx")).graph.initializer}
    w = node.params["weight"]
    assert np.array_equal(stored[w.origin] != 0, w.mask & (w.data != 0))


@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_compaction_is_exact(tmp_path: Path, suffix: str) -> None:
    source = _export(tmp_path / "m.onnx", "torchscript")
    result = optimize(load_onnx_model(source), sparsity=0.9, method="synflow")
    save_model(result, source, tmp_path / "pruned.onnx")
    x = _x().numpy()
    want = _ort(tmp_path / "pruned.onnx", x)
    graph = load_onnx_model(tmp_path / "pruned.onnx")
    from pai_compiler.audit import masks_from_zeros

    masks_from_zeros(graph)
    report = compact_graph(graph)
    save_compact(graph, tmp_path / "pruned.onnx", tmp_path / f"compact{suffix}", report)
    if suffix == ".onnx":
        got = _ort(tmp_path / "compact.onnx", x)
    else:
        with torch.no_grad():
            got = torch.load(tmp_path / "compact.pt", weights_only=False)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_torch_source_writes_masked_and_compact_pt(tmp_path: Path) -> None:
    """A ``file.py:attr`` model: the .pt state dict carries the deconv's mask; the compact module equals the IR's masked forward."""
    from pai_compiler.api import load_model

    source = tmp_path / "encdec.py"
    source.write_text("import torch\nfrom torch import nn\n\n\n" + _module_source())
    spec = f"{source}:EncDec"
    result = optimize(load_model(spec, input_shape="1,3,8,8"), sparsity=0.8, method="synflow")
    (node,) = _deconv(result.graph)
    save_model(result, spec, tmp_path / "pruned.pt")
    saved = torch.load(tmp_path / "pruned.pt", weights_only=False)
    assert np.array_equal(saved["masks"][node.params["weight"].origin].numpy().astype(bool), node.params["weight"].mask)
    x = _x()
    (want,) = _real(result.graph, x)
    model = EncDec().eval()
    model.load_state_dict(saved["state_dict"])
    with torch.no_grad():
        for name, mask in saved["masks"].items():
            model.get_parameter(name).mul_(mask.to(torch.float32))
        np.testing.assert_allclose(model(x).numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    report = compact_graph(result.graph)
    save_compact(result.graph, spec, tmp_path / "fast.pt", report)
    with torch.no_grad():
        got = torch.load(tmp_path / "fast.pt", weights_only=False)(x)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def _module_source() -> str:
    import inspect

    return inspect.getsource(EncDec)


def test_compact_module_trains_the_deconv_weight() -> None:
    """``CompactModule``: the transposed conv's weight and bias are parameters (trainable), its mask a buffer."""
    from pai_compiler.backends.torch_compact import compact_module

    result = optimize(lower_module(EncDec().eval(), (_x(),), "fx"), sparsity=0.8, method="synflow")
    module = compact_module(result.graph)
    (node,) = _deconv(result.graph)
    trainable = {name for name, _ in module.named_parameters()}
    weight, bias = (node.params[k].name.replace(".", "_") for k in ("weight", "bias"))
    assert {weight, bias} <= trainable, trainable
    assert f"{weight}_mask" in {name for name, _ in module.named_buffers()}
    x = _x()
    with torch.no_grad():
        np.testing.assert_allclose(module(x).numpy(), _real(result.graph, x)[0].numpy(), rtol=1e-5, atol=1e-5)
