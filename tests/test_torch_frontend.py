"""Torch frontends (fx, export): equivalence with the ONNX frontend, interpreter vs eager, specs, CLI, API.

Equivalence: for each example model (resnet20, vgg_small, tiny_vit), the ONNX export of the
same module (``export_onnx`` then ``load_onnx_model``) and the fx/export lowerings get
bit-identical masks from magnitude, random and DPaI (3 steps) at a fixed seed, and identical
audit totals. The one spelled-out difference: the ONNX exporter writes a ViT's bias adds
(MatMul + Add), GELU's ``* 0.5`` and attention's ``q, k * scale`` as separate elementwise
nodes and the fused ``attention`` node does not count its softmax, so for tiny_vit the
elementwise MACs differ while the MACs of every weighted layer and activation product agree.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pai_compiler import api
from pai_compiler.lab import zoo
from pai_compiler.audit import audit_graph
from pai_compiler.backends.torch_onnx import export_onnx
from pai_compiler.errors import ModelError, UsageError
from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.frontends.torch.export import lower_export
from pai_compiler.frontends.torch.fx import lower_fx
from pai_compiler.frontends.torch.operands import BATCH
from pai_compiler.frontends.torch.spec import load_torch_spec
from pai_compiler.interp import Interpreter
from pai_compiler.ir import Graph, OpKind

MODELS = ["resnet20", "vgg_small", "tiny_vit"]
FRONTENDS = {"fx": lower_fx, "export": lower_export}
_PRODUCT_KINDS = (OpKind.CONV, OpKind.LINEAR, OpKind.MATMUL, OpKind.ATTENTION)


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return zoo.build(name)


@pytest.fixture(scope="module")
def lowered(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Any]:
    """(model, frontend) -> (graph, module); frontend 'onnx' is the exported file's graph."""
    cache: dict[tuple[str, str], Any] = {}

    def get(name: str, frontend: str) -> tuple[Graph, nn.Module]:
        if (name, frontend) not in cache:
            module = cache.setdefault((name, "module"), _build(name))
            shape = zoo.input_shape(name)
            if frontend == "onnx":
                path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
                export_onnx(module, shape, path)
                graph = load_onnx_model(path)
            else:
                graph = FRONTENDS[frontend](module, torch.randn(2, *shape))
            cache[(name, frontend)] = (graph, module)
        return cache[(name, frontend)]

    return get  # type: ignore[return-value]


def _pruned(graph: Graph, pipeline: str) -> tuple[dict[str, np.ndarray], dict[str, Any], Graph]:
    g = graph.clone()
    result = api.optimize(g, pipeline=pipeline, seed=0)
    return result.masks, audit_graph(g), g


def _product_macs(graph: Graph) -> dict[str, int]:
    """MACs of weighted layers and activation products (conv, linear, matmul, attention) at batch 1."""
    from pai_compiler.pass_infra import AnalysisManager
    from pai_compiler.passes.analysis.flops import FlopsPass, evaluate

    flops = AnalysisManager(graph).get(FlopsPass())
    totals = {"dense": 0, "nonzero": 0, "effective": 0}
    for node in graph.nodes:
        if node.kind in _PRODUCT_KINDS:
            macs = flops.node(node.name)
            for key in totals:
                totals[key] += evaluate(getattr(macs, key), {})
    return totals


def _assert_same(name: str, onnx_doc: dict[str, Any], doc: dict[str, Any], onnx_graph: Graph, graph: Graph) -> None:
    a, b = onnx_doc["totals"], doc["totals"]
    assert a.keys() == b.keys()
    macs_keys = {"macs_dense", "macs_nonzero", "macs_effective", "macs_by_kind"}  # by kind: fused attention vs its decomposition
    for key in a:
        if key in macs_keys and name == "tiny_vit":
            continue
        if isinstance(a[key], float):
            assert b[key] == pytest.approx(a[key], rel=1e-12, abs=1e-12), key
        else:
            assert b[key] == a[key], key
    assert _product_macs(graph) == _product_macs(onnx_graph)
    if name != "tiny_vit":
        assert {k: b[k] for k in macs_keys} == {k: a[k] for k in macs_keys}


# ---- interpreter output == eager ---------------------------------------------------------
@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", MODELS)
def test_interpreter_matches_eager(lowered: Any, name: str, frontend: str) -> None:
    graph, module = lowered(name, frontend)
    x = torch.randn(3, *zoo.input_shape(name), generator=torch.Generator().manual_seed(1))
    module.eval()
    with torch.no_grad():
        expected = module(x)
        (got,) = Interpreter(graph).run([x]).outputs
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert graph.meta["warnings"] == []
    assert graph.inputs[0].shape == (BATCH, *zoo.input_shape(name))
    assert graph.outputs[0].shape == (BATCH, 10)


# ---- masks and audits == ONNX frontend -----------------------------------------------------
@pytest.mark.parametrize("method", ["magnitude", "random"])
@pytest.mark.parametrize("name", MODELS)
def test_masks_and_audit_equal_onnx(lowered: Any, name: str, method: str) -> None:
    onnx_graph, _ = lowered(name, "onnx")
    pipeline = f"erk{{sparsity=0.9}},{method}{{scope=layer}}" if method == "magnitude" else "erk{sparsity=0.9},random"
    onnx_masks, onnx_doc, onnx_pruned = _pruned(onnx_graph, pipeline)
    for frontend in FRONTENDS:
        graph, _ = lowered(name, frontend)
        assert [p.name for p in graph.prunable_params()] == [p.name for p in onnx_graph.prunable_params()]
        assert [(p.out_axis, p.in_axis) for p in graph.prunable_params()] == [(p.out_axis, p.in_axis) for p in onnx_graph.prunable_params()]
        masks, doc, pruned = _pruned(graph, pipeline)
        assert masks.keys() == onnx_masks.keys()
        for key in masks:
            np.testing.assert_array_equal(masks[key], onnx_masks[key], err_msg=f"{frontend}: {key}")
        _assert_same(name, onnx_doc, doc, onnx_pruned, pruned)


def _dpai_modes(name: str) -> list[str]:
    return ["ref", "exact"] if name == "tiny_vit" else ["channel", "ref"]


@pytest.mark.parametrize("name", MODELS)
def test_dpai_masks_equal_onnx(lowered: Any, name: str) -> None:
    onnx_graph, _ = lowered(name, "onnx")
    for mode in _dpai_modes(name):
        pipeline = f"erk{{sparsity=0.9}},dpai{{steps=3,paths={mode}}}"
        onnx_masks, onnx_doc, onnx_pruned = _pruned(onnx_graph, pipeline)
        for frontend in FRONTENDS:
            masks, doc, pruned = _pruned(lowered(name, frontend)[0], pipeline)
            for key in masks:
                np.testing.assert_array_equal(masks[key], onnx_masks[key], err_msg=f"{mode}/{frontend}: {key}")
            _assert_same(name, onnx_doc, doc, onnx_pruned, pruned)


@pytest.mark.parametrize("method", ["synflow", "snip", "grasp"])
def test_gradient_criteria_through_fused_attention_equal_onnx(lowered: Any, method: str) -> None:
    """Real-mode attention rule under autograd (double backward for GraSP) == the ONNX graph."""
    from pai_compiler.lab.data import load_batch_for

    masks = {}
    for frontend in ("onnx", "fx"):
        graph = lowered("tiny_vit", frontend)[0].clone()
        data = load_batch_for(graph, "random", samples_per_class=1, seed=0) if method != "synflow" else None
        masks[frontend] = api.optimize(graph, sparsity=0.9, method=method, seed=0, data=data).masks
    for key in masks["onnx"]:
        np.testing.assert_array_equal(masks["fx"][key], masks["onnx"][key], err_msg=key)


def test_npb_masks_on_fused_attention_equal_onnx(lowered: Any) -> None:
    """NPB decides out_proj from the attention output (not the node's input) on the fused fx node."""
    pipeline = "erk{sparsity=0.9},npb"
    onnx_masks = _pruned(lowered("tiny_vit", "onnx")[0], pipeline)[0]
    masks = _pruned(lowered("tiny_vit", "fx")[0], pipeline)[0]
    assert masks.keys() == onnx_masks.keys()
    for key in masks:
        np.testing.assert_array_equal(masks[key], onnx_masks[key], err_msg=key)


def test_dpai_channel_mode_on_fused_attention(lowered: Any) -> None:
    """DPaI's default channel program on the fx ViT (one attention node per MHA)."""
    onnx_graph, _ = lowered("tiny_vit", "onnx")
    pipeline = "erk{sparsity=0.9},dpai{steps=3}"
    masks, _, _ = _pruned(lowered("tiny_vit", "fx")[0], pipeline)
    onnx_masks, _, _ = _pruned(onnx_graph, pipeline)
    assert masks and masks.keys() == onnx_masks.keys()
    for key in masks:
        np.testing.assert_array_equal(masks[key], onnx_masks[key], err_msg=key)


# ---- attention ------------------------------------------------------------------------------
def test_vit_attention_is_one_node_with_fqn_params(lowered: Any) -> None:
    graph, _ = lowered("tiny_vit", "fx")
    attn = [n for n in graph.nodes if n.kind is OpKind.ATTENTION]
    assert len(attn) == 2 and not any(n.kind is OpKind.MATMUL for n in graph.nodes)
    p = attn[0].params
    assert p["in_proj_weight"].name == p["in_proj_weight"].origin == "blocks.0.attn.in_proj_weight"
    assert (p["in_proj_weight"].shape, p["in_proj_weight"].out_axis, p["in_proj_weight"].in_axis) == ((192, 64), 0, 1)
    assert p["out_proj_weight"].origin == "blocks.0.attn.out_proj.weight" and p["out_proj_weight"].prunable
    assert not p["in_proj_bias"].prunable


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_prune_in_proj_false_keeps_in_proj_dense(frontend: str) -> None:
    module = _build("tiny_vit")
    graph = FRONTENDS[frontend](module, torch.randn(2, 3, 32, 32), prune_in_proj=False)
    names = [p.name for p in graph.prunable_params()]
    assert not any("in_proj" in n for n in names) and "blocks.0.attn.out_proj.weight" in names
    result = api.optimize(graph, pipeline="erk{sparsity=0.9},magnitude{scope=layer}")
    assert "blocks.0.attn.in_proj_weight" not in result.masks


class _CrossAttention(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.q = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=batch_first, kdim=12, vdim=10)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = self.q(x)
        k = memory[..., :12]
        v = memory[..., 2:]
        if not self.batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        out, _ = self.attn(q, k, v)
        return out


@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_separate_projections(batch_first: bool) -> None:
    torch.manual_seed(0)
    module = _CrossAttention(batch_first).eval()
    x, memory = torch.randn(2, 5, 8), torch.randn(2, 7, 12)
    graph = lower_fx(module, (x, memory))
    node = next(n for n in graph.nodes if n.kind is OpKind.ATTENTION)
    assert {k for k, p in node.params.items() if p.prunable} == {"q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj_weight"}
    x3, m3 = torch.randn(3, 5, 8), torch.randn(3, 7, 12)
    with torch.no_grad():
        torch.testing.assert_close(Interpreter(graph).run([x3, m3]).outputs[0], module(x3, m3), rtol=1e-5, atol=1e-5)
    paths = Interpreter(graph, mode="paths", dtype=torch.float64).run([torch.ones(1, 5, 8), torch.ones(1, 7, 12)]).outputs[0]
    assert torch.all(paths > 0)


def test_attention_path_rule_matches_decomposed_gate_rule() -> None:
    """paths(attention) == the decomposed linear/matmul/softmax graph of the export frontend."""
    module = _build("tiny_vit")
    fx_graph, ex_graph = lower_fx(module, torch.randn(2, 3, 32, 32)), lower_export(module, torch.randn(2, 3, 32, 32))
    for g in (fx_graph, ex_graph):
        api.optimize(g, pipeline="erk{sparsity=0.8},random", seed=3)
    ones = torch.ones(1, 3, 32, 32, dtype=torch.float64)
    a = Interpreter(fx_graph, mode="paths", dtype=torch.float64, scaling="exact").run([ones]).outputs[0]
    b = Interpreter(ex_graph, mode="paths", dtype=torch.float64, scaling="exact").run([ones]).outputs[0]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


# ---- coverage of other ops -----------------------------------------------------------------
class _Zoo(nn.Module):
    """Many functional/method spellings in one module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(2, 8)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.avg = nn.AvgPool2d(2, ceil_mode=True)
        self.dw = nn.Conv2d(8, 8, 3, padding="same", groups=8)
        self.act = nn.Hardswish()
        self.adapt = nn.AdaptiveAvgPool2d(2)
        self.proj = nn.Parameter(torch.randn(32, 6) * 0.1)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(12, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.gn(self.conv(x)))
        a, b = y.chunk(2, dim=1)
        y = torch.cat([F.relu6(a), torch.sigmoid(b) * a], dim=1)
        y = self.act(self.dw(y)) + y
        y = self.adapt(self.avg(y))  # 13 -> pool 7 -> avg (ceil) 4 -> (N, 8, 2, 2)
        flat = y.view(y.size(0), -1)  # (N, 32)
        z = self.ln(flat @ self.proj)  # (N, 6)
        z = torch.stack([z, z.mean(dim=-1, keepdim=True).expand_as(z)], dim=1)  # (N, 2, 6)
        att = F.scaled_dot_product_attention(z, z, z)
        first, second = att.unbind(1)
        out = self.fc(self.drop(torch.cat([first, second], dim=-1)))
        return F.log_softmax(out.permute(1, 0).t(), dim=-1)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_many_ops_match_eager(frontend: str) -> None:
    torch.manual_seed(0)
    module = _Zoo()
    graph = FRONTENDS[frontend](module, torch.randn(2, 3, 13, 13))
    assert module.training  # lowering evaluates in eval mode and restores the flag
    module.eval()
    assert graph.meta["warnings"] == []
    assert not any(n.kind is OpKind.OPAQUE for n in graph.nodes)
    names = {p.name for p in graph.prunable_params()}
    assert {"conv.weight", "dw.weight", "proj", "fc.weight"} <= names
    proj = next(p for p in graph.prunable_params() if p.name == "proj")
    assert (proj.out_axis, proj.in_axis) == (1, 0)  # x @ W: W is stored (in, out)
    x = torch.randn(5, 3, 13, 13)
    with torch.no_grad():
        torch.testing.assert_close(Interpreter(graph).run([x]).outputs[0], module(x), rtol=1e-5, atol=1e-5)


def test_decomposed_core_aten_matches_eager() -> None:
    torch.manual_seed(0)
    module = zoo.build("tiny_vit", depth=1).eval()
    graph = lower_export(module, torch.randn(2, 3, 32, 32), decompose=True)
    assert graph.meta["warnings"] == []
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(Interpreter(graph).run([x]).outputs[0], module(x), rtol=1e-5, atol=1e-5)
    assert [p.name for p in graph.prunable_params()][:3] == ["patch_embed.weight", "blocks.0.attn.in_proj_weight", "blocks.0.attn.out_proj.weight"]


def test_unknown_op_is_opaque_with_warning() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.cumsum(x, dim=1))

    graph = lower_fx(Odd(), torch.randn(2, 4))
    opaque = [n for n in graph.nodes if n.kind is OpKind.OPAQUE]
    assert len(opaque) == 1 and opaque[0].outputs[0].shape == (BATCH, 4)
    assert any("opaque" in w for w in graph.meta["warnings"])


def test_untraceable_module_names_the_export_frontend() -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(ModelError, match="--frontend export"):
        lower_fx(Branchy(), torch.randn(2, 3))


def test_graph_keeps_module_handle_and_clone_shares_it(lowered: Any) -> None:
    graph, module = lowered("resnet20", "fx")
    clone = graph.clone()
    assert clone.meta["torch_module"].module is module
    assert graph.meta["source_format"] == "torch" and graph.meta["input_shape"] == [2, 3, 32, 32]
    assert all(p.name == p.origin and p.name in dict(module.named_parameters()) for p in graph.prunable_params())


# ---- file.py:attr specs ----------------------------------------------------------------------
MODELS_PY = textwrap.dedent(
    """
    import torch
    from torch import nn
    from pai_compiler.lab.zoo.vgg import vgg_small

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(12, 8)
            self.fc2 = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x.flatten(1))))

    def factory():
        return Small()

    instance = Small()
    number = 3

    class NotAModule:
        pass
    """
)


@pytest.fixture()
def models_py(tmp_path: Path) -> Path:
    path = tmp_path / "my_models.py"
    path.write_text(MODELS_PY)
    return path


@pytest.mark.parametrize("attr", ["Small", "factory", "instance"])
def test_spec_class_factory_instance(models_py: Path, attr: str) -> None:
    graph = load_torch_spec(f"{models_py}:{attr}", input_shape=(2, 3, 4))
    assert [p.name for p in graph.prunable_params()] == ["fc1.weight", "fc2.weight"]
    assert graph.meta["torch_spec"].endswith(f":{attr}")


def test_spec_class_is_seeded(models_py: Path) -> None:
    a = load_torch_spec(f"{models_py}:Small", input_shape="2,12")
    b = load_torch_spec(f"{models_py}:Small", input_shape="2,12", frontend="export")
    np.testing.assert_array_equal(a.prunable_params()[0].data, b.prunable_params()[0].data)


@pytest.mark.parametrize(
    ("spec", "kwargs", "error", "match"),
    [
        ("missing.py:Small", {"input_shape": (2, 12)}, ModelError, "no such file"),
        ("{path}:Nope", {"input_shape": (2, 12)}, ModelError, "has no attribute 'Nope'"),
        ("{path}:number", {"input_shape": (2, 12)}, ModelError, "not an nn.Module"),
        ("{path}:NotAModule", {"input_shape": (2, 12)}, ModelError, "not a torch.nn.Module"),
        ("{path}:Small", {}, UsageError, "--input-shape"),
        ("{path}:Small", {"input_shape": "2,x"}, UsageError, "--input-shape"),
        ("{path}:Small", {"input_shape": (2, 12), "frontend": "jit"}, UsageError, "--frontend"),
    ],
)
def test_spec_errors_are_one_line(models_py: Path, spec: str, kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match) as info:
        load_torch_spec(spec.format(path=models_py), **kwargs)
    assert "\n" not in str(info.value)


def test_load_model_dispatches_specs(models_py: Path) -> None:
    graph = api.load_model(f"{models_py}:Small", input_shape="2,12", frontend="export")
    assert graph.meta["frontend"] == "export"


# ---- CLI and backends ------------------------------------------------------------------------
class _Run:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _paic(*args: str, cwd: Path) -> _Run:
    """Run the CLI in-process (a subprocess would re-import torch for every call)."""
    import os

    from typer.testing import CliRunner

    from pai_compiler.cli import app

    before = os.getcwd()
    os.chdir(cwd)
    try:
        res = CliRunner().invoke(app, list(args))
    finally:
        os.chdir(before)
    return _Run(res.exit_code, res.stdout, res.stderr)


def test_cli_optimize_spec_to_pt_and_onnx(tmp_path: Path) -> None:
    (tmp_path / "nets.py").write_text("from pai_compiler.lab.zoo.vgg import vgg_small\nclass Net:\n    pass\n")
    r = _paic("optimize", "nets.py:vgg_small", "--input-shape", "2,3,32,32", "-o", "pruned.pt", "-s", "0.9", "-m", "magnitude", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _paic("optimize", "nets.py:vgg_small", "--input-shape", "2,3,32,32", "-o", "again.pt", "-s", "0.9", "-m", "magnitude", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # byte for byte: the zip records are not named after the random temp file
    assert (tmp_path / "again.pt").read_bytes() == (tmp_path / "pruned.pt").read_bytes()
    payload = torch.load(tmp_path / "pruned.pt", weights_only=True)
    assert set(payload) == {"state_dict", "masks", "meta"}
    meta = payload["meta"]
    assert meta["model"] == "nets.py:vgg_small" and meta["input_shape"] == [2, 3, 32, 32] and "magnitude" in meta["pipeline"]
    for fqn, mask in payload["masks"].items():
        assert mask.dtype == torch.bool
        assert torch.all(payload["state_dict"][fqn][~mask] == 0)
    from pai_compiler.backends.torch_backend import load_pt

    torch.manual_seed(5)
    fresh = load_pt(tmp_path / "pruned.pt", zoo.build("vgg_small"))
    assert hasattr(fresh.features[0], "weight_orig") and torch.equal(fresh.features[0].weight_mask.bool(), payload["masks"]["features.0.weight"])

    r = _paic("optimize", "nets.py:vgg_small", "--input-shape", "2,3,32,32", "-o", "pruned.onnx", "-s", "0.9", "-m", "magnitude",
              "--frontend", "export", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    graph = load_onnx_model(tmp_path / "pruned.onnx")
    assert graph.inputs[0].shape[0] == sympy_batch(graph)
    for p in graph.prunable_params():
        np.testing.assert_array_equal(p.data != 0, payload["masks"][p.name].numpy() & (p.data != 0))
        assert np.count_nonzero(p.data) <= int(payload["masks"][p.name].sum())
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "pruned.onnx"), providers=["CPUExecutionProvider"])
    model = load_pt(tmp_path / "pruned.pt", zoo.build("vgg_small")).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], model(x).numpy(), rtol=1e-4, atol=1e-5)

    for args, code, text in [
        (("nets.py:vgg_small", "-o", "x.pt", "-s", "0.9"), 2, "--input-shape"),
        (("nets.py:Net", "--input-shape", "2,3,32,32", "-o", "x.pt", "-s", "0.9"), 1, "not a torch.nn.Module"),
        (("nets.py:vgg_small", "--input-shape", "2,3,32,32", "--frontend", "jit", "-o", "x.pt", "-s", "0.9"), 2, "--frontend"),
    ]:
        r = _paic("optimize", *args, cwd=tmp_path)
        assert r.returncode == code and text in r.stderr and "Traceback" not in r.stderr, r.stderr


def sympy_batch(graph: Graph) -> Any:
    return graph.meta["symbols"]["batch"]


def test_cli_audit_accepts_spec(tmp_path: Path) -> None:
    (tmp_path / "nets.py").write_text("from pai_compiler.lab.zoo.lenet import lenet300\n")
    r = _paic("audit", "nets.py:lenet300", "--input-shape", "2,1,28,28", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    import json

    doc = json.loads(r.stdout)
    assert doc["totals"]["params"] == 266200 and doc["totals"]["density"] == 1.0


# ---- Python API --------------------------------------------------------------------------------
def test_prune_api_masks_report_and_apply() -> None:
    import pai_compiler
    from pai_compiler.audit import TOTAL_KEYS
    from pai_compiler.prune import default_method

    model = _build("tiny_vit")
    result = pai_compiler.prune(model, torch.randn(2, 3, 32, 32), sparsity=0.9, method="magnitude", seed=0)
    assert default_method() in ("dpai", "magnitude")
    assert set(result.report["totals"]) == set(TOTAL_KEYS)
    assert result.report["totals"]["density"] == pytest.approx(result.density)
    assert all(m.dtype == torch.bool for m in result.masks.values())
    assert "blocks.0.attn.in_proj_weight" in result.masks and "blocks.0.attn.out_proj.weight" in result.masks
    assert math.isclose(result.density, 0.1, abs_tol=2e-3)
    x = torch.randn(3, 3, 32, 32)
    result.apply(model)
    attn = model.blocks[0].attn
    assert isinstance(attn.in_proj_weight_orig, nn.Parameter) and attn.in_proj_weight_mask.shape == (192, 64)
    assert torch.all(attn.in_proj_weight[~result.masks["blocks.0.attn.in_proj_weight"]] == 0)
    model.eval()
    graph = result.graph
    with torch.no_grad():
        torch.testing.assert_close(Interpreter(graph).run([x]).outputs[0], model(x), rtol=1e-5, atol=1e-5)
    from torch.nn.utils import prune as torch_prune

    torch_prune.remove(attn, "in_proj_weight")
    assert isinstance(attn.in_proj_weight, nn.Parameter) and torch.all(attn.in_proj_weight[~result.masks["blocks.0.attn.in_proj_weight"]] == 0)


def test_prune_api_export_frontend_matches_fx() -> None:
    import pai_compiler

    model = _build("resnet20")
    a = pai_compiler.prune(model, (2, 3, 32, 32), sparsity=0.8, method="random", report=False)
    b = pai_compiler.prune(model, (2, 3, 32, 32), sparsity=0.8, method="random", frontend="export", report=False)
    assert a.masks.keys() == b.masks.keys() and all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert not hasattr(model.conv, "weight_orig")  # prune() leaves the module alone
    with pytest.raises(UsageError):
        pai_compiler.prune("not a module", (2, 3))


# ---- a weight read as W and as Wᵀ ----------------------------------------------------------
class _TiedSquare(nn.Module):
    """``relu(x Wᵀ) W``: one square weight read in two layouts (tied encoder/decoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 6, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.enc(x))
        return self.head(h @ self.enc.weight)


@pytest.mark.parametrize("frontend", ["fx", "export", "onnx"])
def test_weight_in_two_layouts_computes_the_model(frontend: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = _TiedSquare().eval()
    if frontend == "onnx":
        export_onnx(module, (6,), tmp_path / "tied.onnx")
        graph = load_onnx_model(tmp_path / "tied.onnx")
    else:
        graph = (lower_fx if frontend == "fx" else lower_export)(module, torch.randn(2, 6))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(Interpreter(graph).run([x]).outputs[0], module(x), rtol=1e-5, atol=1e-6)
    assert any("two layouts" in w for w in graph.meta["warnings"])
    assert len(graph.prunable_params()) == 1  # the head; the tied weight stays dense
    from pai_compiler.backends.torch_compact import compact_module

    compact = compact_module(graph)  # one trainable tensor for both layouts, so training keeps them tied
    assert len(list(compact.parameters())) == 3  # the tied weight, the head's weight and bias
    with torch.no_grad():
        torch.testing.assert_close(compact(x), module(x), rtol=1e-5, atol=1e-6)


class _TiedHead(nn.Module):
    """A language-model-style tie: ``head.weight`` *is* ``emb.weight`` (one nn.Parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(self.emb(idx))))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_module_level_tied_weights_are_one_param(frontend: str) -> None:
    torch.manual_seed(0)
    module = _TiedHead().eval()
    idx = torch.tensor([[1, 4, 9], [0, 2, 3]])
    graph = (lower_fx if frontend == "fx" else lower_export)(module, idx)
    origins = sorted({p.origin for p in graph.params() if p.origin.endswith("weight")})
    assert len(origins) == 2 and "mix.weight" in origins  # emb.weight and head.weight are one Param
    assert [p.origin for p in graph.prunable_params()] == ["mix.weight"]  # the tied table stays dense
    with torch.no_grad():
        torch.testing.assert_close(Interpreter(graph).run([idx]).outputs[0], module(idx), rtol=1e-5, atol=1e-6)


def test_fx_reads_a_weight_through_dot_T() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W = nn.Parameter(torch.randn(5, 6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.W.T + x @ self.W.mT

    torch.manual_seed(0)
    module = M().eval()
    graph = lower_fx(module, torch.randn(2, 6))
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(Interpreter(graph).run([x]).outputs[0], module(x), rtol=1e-5, atol=1e-6)
    assert [p.origin for p in graph.prunable_params()] == ["W"]


def test_tied_linear_weights_are_masked_under_every_name(tmp_path: Path) -> None:
    import pai_compiler
    from pai_compiler.backends.torch_backend import masked_state_dict

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.b.weight = self.a.weight
            self.o = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o(torch.relu(self.b(torch.relu(self.a(x)))))

    torch.manual_seed(0)
    model = Tied()
    pruned = pai_compiler.prune(model, torch.randn(2, 8), sparsity=0.7, method="magnitude", report=False)
    state = masked_state_dict(model, pruned.masks)
    assert torch.equal(state["a.weight"], state["b.weight"]) and 0 < int((state["a.weight"] != 0).sum()) < 64
    pruned.apply(model)
    assert torch.equal(model.a.weight, model.b.weight) and model.a.weight_orig is model.b.weight_orig
    assert torch.equal(model.a.weight, state["a.weight"])


class _PositionalTokens(nn.Module):
    """Token + position embeddings with position ids built from the input's sizes (batch-dependent ``expand``)."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(20, 6)
        self.positions = nn.Embedding(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
        return self.head(self.tokens(ids) + self.positions(positions))


@pytest.mark.parametrize("lower", [lower_fx, lower_export], ids=["fx", "export"])
def test_batch_sized_constants_fold_at_trace_time(lower: Any) -> None:
    torch.manual_seed(0)
    module = _PositionalTokens().eval()
    graph = lower(module, torch.randint(0, 20, (2, 5)))
    assert not [n for n in graph.nodes if n.kind is OpKind.OPAQUE and n.attrs.get("op") != "embedding"]
    for batch in (1, 4):  # folded once, right at every batch
        ids = torch.randint(0, 20, (batch, 5))
        torch.testing.assert_close(Interpreter(graph).run([ids]).outputs[0], module(ids), rtol=1e-5, atol=1e-6)


class _PerSampleConstant(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.arange(x.shape[0]).unsqueeze(1).float()


@pytest.mark.parametrize("lower", [lower_fx, lower_export], ids=["fx", "export"])
def test_constant_that_varies_per_sample_is_refused_by_name(lower: Any) -> None:
    with pytest.raises(ModelError, match="differs per sample"):
        lower(_PerSampleConstant(), torch.randn(3, 4))


def test_keyword_inputs_and_dict_outputs_through_both_frontends() -> None:
    class Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None, shift: float = 1.0) -> dict[str, Any]:
            y = self.fc(x) + shift
            return {"y": y if scale is None else y * scale, "unused": None, "pair": (x, y)}

    module = Named().eval()
    example = {"x": torch.randn(2, 4), "scale": torch.rand(2, 3)}
    for lower in (lower_fx, lower_export):
        graph = lower(module, example)
        assert [v.name for v in graph.inputs] == ["x", "scale"]
        got = Interpreter(graph).run(list(example.values())).outputs
        expected = module(**example)
        assert len(got) == 3
        for g, e in zip(got, (expected["y"], expected["pair"][0], expected["pair"][1])):
            torch.testing.assert_close(g, e)
