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
from pai_compiler.ir import Graph, GraphBuilder, OpKind
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
    from pai_compiler.backends.torch_onnx import export_onnx

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
    b = GraphBuilder("sparse")
    y = b.conv(b.input((batch, 3, 8, 8)), 4, 3, stride=2, pad=1)
    o = b.linear(b.flatten(b.global_pool(b.relu(b.batch_norm(y)))), 5)
    mask = np.zeros((4, 3, 3, 3), bool)
    mask[0, :, 1, 1] = True  # 3 taps, all into output channel 0
    mask[3, 0, :, :] = True  # 9 taps into channel 3
    b.set_mask(y, mask)
    fc_mask = np.zeros((5, 4), bool)
    fc_mask[:, 0] = True  # only channel 0 reaches the output: channel 3 is a dead end
    b.set_mask(o, fc_mask)
    return b.build(o)


def test_rules_dense_nonzero_effective_on_a_hand_graph() -> None:
    res = flops(sparse_graph(), effective=True)
    # (dense, nonzero, effective), per sample; 16 output pixels. Weight-free nodes count only
    # live elements as effective: channel 0 (16 of 64 elements; channel 3 reaches nothing)
    expected = {
        "conv1": (16 * 4 * 3 * 9, 16 * 12, 16 * 3),
        "bn1": (64, 64, 16),
        "relu1": (64, 64, 16),
        "gap1": (64, 64, 16),
        "flatten1": (0, 0, 0),
        "fc1": (20, 5, 5),
    }
    for name, (dense, nonzero, effective) in expected.items():
        r = res.node(name)
        assert (r.dense, r.nonzero, r.effective) == (dense * batch, nonzero * batch, effective * batch), name
    assert res.evaluate({"batch": 2}) == {"dense": 2 * 1940, "nonzero": 2 * 389, "effective": 2 * 101}
    assert res.node("x").dense == 0 and res.node("out").dense == 0


def test_pooling_matmul_and_elementwise_rules() -> None:
    b = GraphBuilder("misc")
    p = b.pool(b.input((2, 3, 6, 6)), "max", 3, 1)
    s = b.softmax(p)
    m = b.matmul(s, p)
    g = b.build(b.concat(b.add(m, s), m))
    res = flops(g)
    # a static batch of 2 is counted per sample, times the symbol ``batch``: bound to 2 here
    assert {r.node: evaluate(r.dense, {"batch": 2}) for r in res.nodes} == {
        "x": 0, "pool1": 96 * 9, "softmax1": 96, "matmul1": 96 * 4, "add1": 96, "concat1": 0, "out": 0,
    }
    assert evaluate(res.dense) * 2 == evaluate(res.dense, {"batch": 2})
    assert res.effective is None and all(r.effective is None for r in res.nodes)


def test_opaque_counts_zero_and_effective_falls_back() -> None:
    g = sparse_graph()
    relu = g.node("relu1")
    weird = g.add_node(OpKind.OPAQUE, "weird", [relu.outputs[0]], [("w", (batch, 4, 4, 4), "float32")], attrs={"op_type": "Weird"}, before=g.node("gap1"))
    g.set_input(g.node("gap1"), 0, weird.outputs[0])
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
