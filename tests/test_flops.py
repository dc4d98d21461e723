"""flops: symbolic dense / nonzero / effective MACs, checked against torch's FlopCounterMode."""
from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sympy

from pai_compiler.errors import UsageError
from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.ir import Graph, OpKind, Param
from pai_compiler.pass_infra import AnalysisManager
from pai_compiler.passes.analysis.bindings import parse_bind
from pai_compiler.passes.analysis.flops import MAC_RULES, FlopsPass, FlopsResult, evaluate

WEIGHTED_MATMULS = ("conv", "linear", "matmul")
batch = sympy.Symbol("batch", integer=True, positive=True)


def flops(g: Graph, effective: bool = False) -> FlopsResult:
    return AnalysisManager(g).get(FlopsPass(effective=effective))


def gemm_macs(res: FlopsResult, bind: dict[str, int] | None = None) -> int:
    return sum(evaluate(r.dense, bind) for r in res.nodes if r.kind in WEIGHTED_MATMULS)


@contextlib.contextmanager
def unfused_attention() -> Iterator[None]:
    """MHA's fused fast path and flash SDPA are invisible to FlopCounterMode: use the math path."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def torch_macs(name: str, batch_size: int) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pai_compiler.lab import zoo

    torch.manual_seed(0)
    model = zoo.build(name).eval()
    with torch.no_grad(), unfused_attention(), FlopCounterMode(display=False) as counter:
        model(torch.ones(batch_size, *zoo.input_shape(name)))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("name", ["resnet20", "vgg_small", "tiny_vit"])
def test_gemm_macs_match_flop_counter(name: str, examples_dir: Path) -> None:
    res = flops(load_onnx_model(examples_dir / f"{name}.onnx"))
    assert gemm_macs(res) == torch_macs(name, 1)
    assert gemm_macs(res, {"batch": 3}) == torch_macs(name, 3)
    assert all(r.dense == r.nonzero for r in res.nodes)  # dense model


def test_resnet50_macs(tmp_path: Path) -> None:
    import torch

    from pai_compiler.lab import zoo
    from pai_compiler.lab.zoo.export import export_onnx

    torch.manual_seed(0)
    export_onnx(zoo.build("resnet50"), zoo.input_shape("resnet50"), tmp_path / "r50.onnx")
    res = flops(load_onnx_model(tmp_path / "r50.onnx"))
    assert gemm_macs(res) == 4_089_184_256
    assert sympy.simplify(sum(r.dense for r in res.nodes if r.kind in ("conv", "linear")) - 4_089_184_256 * batch) == 0


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_fused_attention_matches_flop_counter(frontend: str, tmp_path: Path) -> None:
    """The torch frontends keep nn.MultiheadAttention as one ``attention`` node."""
    pytest.importorskip("pai_compiler.frontends.torch.spec")
    from pai_compiler.api import load_model

    spec = tmp_path / "models.py"
    spec.write_text("from pai_compiler.lab import zoo\n\ndef tiny_vit():\n    return zoo.build('tiny_vit')\n")
    g = load_model(f"{spec}:tiny_vit", input_shape="1,3,32,32", frontend=frontend)
    res = flops(g)
    gemm = sum(evaluate(r.dense) for r in res.nodes if r.kind in (*WEIGHTED_MATMULS, "attention"))
    assert gemm == torch_macs("tiny_vit", 1)


def test_tiny_vit_is_symbolic_in_batch(examples_dir: Path) -> None:
    res = flops(load_onnx_model(examples_dir / "tiny_vit.onnx"))
    assert res.dense.free_symbols == {batch}
    assert res.evaluate({"batch": 32})["dense"] == 32 * res.evaluate()["dense"]
    attention = [r for r in res.nodes if r.kind == "matmul"]
    assert len(attention) == 4 and all(evaluate(r.dense) == 4 * 17 * 17 * 16 for r in attention)


def sparse_graph() -> Graph:
    """conv 3->4 (k3, pad 1, stride 2) on batch x 3 x 8 x 8, BN, ReLU, global pool, linear 4->5."""
    g = Graph("sparse")
    x = g.add_node(OpKind.INPUT, "x", (), [("x", (batch, 3, 8, 8), "float32")]).outputs[0]
    w = Param("conv.weight", np.ones((4, 3, 3, 3), np.float32), prunable=True)
    attrs = {"strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [1, 1], "groups": 1, "kernel_shape": [3, 3]}
    y = g.add_node(OpKind.CONV, "conv", [x], [("y", (batch, 4, 4, 4), "float32")], params={"weight": w}, attrs=attrs).outputs[0]
    n = g.add_node(OpKind.NORM, "bn", [y], [("n", (batch, 4, 4, 4), "float32")], attrs={"type": "batch", "epsilon": 1e-5}).outputs[0]
    r = g.add_node(OpKind.POINTWISE, "relu", [n], [("r", (batch, 4, 4, 4), "float32")], attrs={"op": "relu"}).outputs[0]
    p = g.add_node(OpKind.POOL, "gap", [r], [("p", (batch, 4, 1, 1), "float32")], attrs={"mode": "avg", "reduce": True, "axes": [2, 3], "keepdims": True}).outputs[0]
    f = g.add_node(OpKind.RESHAPE, "flat", [p], [("f", (batch, 4), "float32")], attrs={"op": "reshape", "shape": [batch, 4]}).outputs[0]
    fc = Param("fc.weight", np.ones((5, 4), np.float32), prunable=True)
    o = g.add_node(OpKind.LINEAR, "fc", [f], [("o", (batch, 5), "float32")], params={"weight": fc}).outputs[0]
    g.add_node(OpKind.OUTPUT, "out", [o])
    mask = np.zeros((4, 3, 3, 3), bool)
    mask[0, :, 1, 1] = True  # 3 taps, all into output channel 0
    mask[3, 0, :, :] = True  # 9 taps into channel 3
    g.set_mask(w, mask)
    fc_mask = np.zeros((5, 4), bool)
    fc_mask[:, 0] = True  # only channel 0 reaches the output: channel 3 is a dead end
    g.set_mask(fc, fc_mask)
    return g


def test_rules_dense_nonzero_effective_on_a_hand_graph() -> None:
    res = flops(sparse_graph(), effective=True)
    expected = {  # (dense, nonzero, effective), per sample; 16 output pixels
        "conv": (16 * 4 * 3 * 9, 16 * 12, 16 * 3),
        "bn": (64, 64, 64),
        "relu": (64, 64, 64),
        "gap": (64, 64, 64),
        "flat": (0, 0, 0),
        "fc": (20, 5, 5),
    }
    for name, (dense, nonzero, effective) in expected.items():
        r = res.node(name)
        assert (r.dense, r.nonzero, r.effective) == (dense * batch, nonzero * batch, effective * batch), name
    assert res.evaluate({"batch": 2}) == {"dense": 2 * 1940, "nonzero": 2 * 389, "effective": 2 * 245}
    assert res.node("x").dense == 0 and res.node("out").dense == 0


def test_pooling_matmul_and_elementwise_rules() -> None:
    g = Graph("misc")
    x = g.add_node(OpKind.INPUT, "x", (), [("x", (2, 3, 6, 6), "float32")]).outputs[0]
    attrs = {"mode": "max", "reduce": False, "kernel_shape": [3, 3], "strides": [1, 1], "pads": [0] * 4, "dilations": [1, 1]}
    p = g.add_node(OpKind.POOL, "pool", [x], [("p", (2, 3, 4, 4), "float32")], attrs=attrs).outputs[0]
    s = g.add_node(OpKind.SOFTMAX, "softmax", [p], [("s", (2, 3, 4, 4), "float32")], attrs={"axis": -1}).outputs[0]
    m = g.add_node(OpKind.MATMUL, "mm", [s, p], [("m", (2, 3, 4, 4), "float32")]).outputs[0]
    a = g.add_node(OpKind.ADD, "add", [m, s], [("a", (2, 3, 4, 4), "float32")], attrs={"op": "add"}).outputs[0]
    c = g.add_node(OpKind.CONCAT, "cat", [a, m], [("c", (2, 6, 4, 4), "float32")], attrs={"axis": 1}).outputs[0]
    g.add_node(OpKind.OUTPUT, "out", [c])
    res = flops(g)
    assert {r.node: int(r.dense) for r in res.nodes} == {
        "x": 0, "pool": 96 * 9, "softmax": 96, "mm": 96 * 4, "add": 96, "cat": 0, "out": 0,
    }
    assert res.effective is None and all(r.effective is None for r in res.nodes)


def test_opaque_counts_zero_and_effective_falls_back() -> None:
    g = sparse_graph()
    relu = g.node("relu")
    weird = g.add_node(OpKind.OPAQUE, "weird", [relu.outputs[0]], [("w", (batch, 4, 4, 4), "float32")], attrs={"op_type": "Weird"}, before=g.node("gap"))
    g.set_input(g.node("gap"), 0, weird.outputs[0])
    g.verify()
    res = flops(g, effective=True)
    assert res.node("weird").dense == 0
    assert any("'weird' is opaque (Weird)" in w for w in res.warnings)
    assert any(w.startswith("flops: effective MACs equal nonzero MACs") for w in res.warnings)
    assert res.effective == res.nonzero


def test_rule_table_covers_every_kind() -> None:
    assert set(OpKind) - set(MAC_RULES) == {OpKind.OPAQUE}


def test_parse_bind() -> None:
    assert parse_bind("batch=32, seq=197") == {"batch": 32, "seq": 197}
    assert parse_bind(None) == {} and parse_bind("") == {}
    for bad in ("batch", "batch=0", "batch=x", "1x=2"):
        with pytest.raises(UsageError, match="bad binding"):
            parse_bind(bad)


def test_dense_and_nonzero_need_no_torch(examples_dir: Path) -> None:
    code = (
        "import sys\n"
        "from pai_compiler.frontends.onnx.reader import load_onnx_model\n"
        "from pai_compiler.pass_infra import AnalysisManager\n"
        "from pai_compiler.passes.analysis.flops import FlopsPass\n"
        f"g = load_onnx_model({str(examples_dir / 'resnet20.onnx')!r})\n"
        "r = AnalysisManager(g).get(FlopsPass(effective=False))\n"
        "assert r.evaluate()['dense'] == 41292416, r.evaluate()\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
