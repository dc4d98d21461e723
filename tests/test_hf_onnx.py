"""Hugging Face models through the ONNX route: every criterion, the audit, real semantics and honest MACs.

The models are built from tiny configs with random weights (``tests/hf_exports.py``) and
exported into ``tmp_path`` by the TorchScript exporter (static and dynamic batch/sequence) and
the dynamo exporter (static and dynamic). Checks: nothing but lookups, size-computed tensors,
selects and run-time gathers stays opaque; the interpreter reproduces the torch model at sizes
other than the traced ones; every criterion prunes to the asked sparsity; ``paic audit`` has
paths; MACs count a static batch once and conv + linear + matmul equals FlopCounterMode.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from hf_exports import CASES, Exporter, build_model, export_case
from pai_compiler import api
from pai_compiler.audit import audit_graph
from pai_compiler.cli import app
from pai_compiler.frontends.onnx import load_onnx_model
from pai_compiler.interp import Interpreter
from pai_compiler.ir import Graph, OpKind
from pai_compiler.lab.data import Batch, load_batch_for
from pai_compiler.pass_infra import AnalysisManager
from pai_compiler.passes.analysis.flops import FlopsPass

KNOWN_OPAQUE = {"embedding", "shape_data", "where", "gather"}  # opaque nodes the interpreter evaluates
FAST = [(m, e) for m in ("bert", "gpt2", "vit") for e in ("torchscript", "dynamo")] + [
    ("gpt2", "torchscript-dynamic"), ("bert", "torchscript-dynamic"), ("vit", "dynamo-dynamic"),
]
SLOW = [(m, e) for m in CASES for e in ("torchscript", "torchscript-dynamic", "dynamo", "dynamo-dynamic") if (m, e) not in FAST]
CRITERIA = ["magnitude", "random", "random-erk", "synflow", "snip", "grasp", "npb", "dpai", "autosparse"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, Exporter], Path]:
    """Export each (model, exporter) once per module."""
    folder = tmp_path_factory.mktemp("hf")
    done: dict[tuple[str, str], Path] = {}

    def get(model: str, exporter: Exporter) -> Path:
        if (model, exporter) not in done:
            done[(model, exporter)] = export_case(CASES[model], exporter, folder / f"{model}_{exporter}.onnx")
        return done[(model, exporter)]

    return get


def _unknown_opaque(graph: Graph) -> list[str]:
    return [f"{n.name} ({n.attrs.get('op_type')})" for n in graph.nodes if n.kind is OpKind.OPAQUE and n.attrs.get("op") not in KNOWN_OPAQUE]


def _check_real_semantics(model: str, exporter: Exporter, path: Path) -> None:
    """The interpreter's real mode equals the torch model, at other sizes where the export is dynamic."""
    graph = load_onnx_model(path)
    assert _unknown_opaque(graph) == []
    case = CASES[model]
    batch = 3 if exporter.endswith("-dynamic") else 1
    x = case.example(batch)
    if exporter.endswith("-dynamic") and 1 in case.dynamic_axes:  # another sequence length than the traced 8
        x = x[:, :5]
    with torch.no_grad():
        want = build_model(case)(x)
        got = Interpreter(graph, mode="real").run([x]).outputs[0]
    assert tuple(got.shape) == tuple(want.shape)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _optimize(path: Path, method: str, sparsity: float = 0.5) -> api.OptimizeResult:
    graph = load_onnx_model(path)
    data = None
    if method in ("snip", "grasp", "autosparse"):  # 16 samples: a backbone's "classes" are its features (1280 on MobileNetV2)
        full = load_batch_for(graph, "random", samples_per_class=1)
        data = Batch(full.x[:16], full.y[:16], full.meta)
    steps = 2 if method == "dpai" else None
    return api.optimize(graph, sparsity=sparsity, method=method, data=data, steps=steps)


def _density(result: api.OptimizeResult) -> float:
    params = result.graph.prunable_params()
    return sum(p.kept() for p in params) / sum(p.numel for p in params)


@pytest.mark.parametrize(("model", "exporter"), FAST, ids=[f"{m}-{e}" for m, e in FAST])
def test_export_runs_audit_and_data_criteria(exports: Callable[[str, Exporter], Path], model: str, exporter: Exporter) -> None:
    path = exports(model, exporter)
    _check_real_semantics(model, exporter, path)
    doc = audit_graph(load_onnx_model(path))
    assert doc["totals"]["log_paths"] is not None and doc["totals"]["log_paths"] > 0
    assert not [w for w in doc["warnings"] if "opaque" in w or "skipped" in w]
    for method in ("synflow", "snip"):
        assert _density(_optimize(path, method)) == pytest.approx(0.5, abs=0.01), method


@pytest.mark.parametrize("method", CRITERIA)
def test_every_criterion_on_a_dynamic_sequence_export(exports: Callable[[str, Exporter], Path], method: str) -> None:
    """GPT-2 with dynamic batch and sequence: positions from Range, a causal mask from sizes."""
    result = _optimize(exports("gpt2", "torchscript-dynamic"), method)
    assert _density(result) == pytest.approx(0.5, abs=0.01)
    assert all(p.mask is not None for p in result.graph.prunable_params())


@pytest.mark.slow
@pytest.mark.parametrize(("model", "exporter"), SLOW, ids=[f"{m}-{e}" for m, e in SLOW])
def test_every_model_exporter_and_criterion(exports: Callable[[str, Exporter], Path], model: str, exporter: Exporter) -> None:
    path = exports(model, exporter)
    _check_real_semantics(model, exporter, path)
    assert audit_graph(load_onnx_model(path))["totals"]["log_paths"] is not None
    for method in CRITERIA:
        assert _density(_optimize(path, method)) == pytest.approx(0.5, abs=0.01), method


def test_audit_cli_has_paths_and_macs_by_kind(exports: Callable[[str, Exporter], Path]) -> None:
    result = CliRunner().invoke(app, ["audit", str(exports("bert", "torchscript-dynamic")), "--json", "--bind", "seq=8"])
    assert result.exit_code == 0, result.output
    totals = json.loads(result.stdout)["totals"]
    assert totals["log_paths"] is not None
    assert sum(totals["macs_by_kind"].values()) == totals["macs_dense"]
    assert {"linear", "matmul", "norm", "softmax", "add"} <= set(totals["macs_by_kind"])


def _macs(path: Path, bind: dict[str, int] | None = None) -> tuple[int, dict[str, int]]:
    flops = AnalysisManager(load_onnx_model(path)).get(FlopsPass(effective=False))
    return int(flops.evaluate(bind)["dense"]), flops.by_kind(bind)


def test_static_batch_counts_once(tmp_path: Path) -> None:
    """ConvNeXt exported at batch 4 reports the MACs of batch 1, and 4x with --bind batch=4."""
    one = export_case(CASES["convnext"], "torchscript", tmp_path / "b1.onnx", batch=1)
    four = export_case(CASES["convnext"], "torchscript", tmp_path / "b4.onnx", batch=4)
    assert _macs(four) == _macs(one)
    assert _macs(four, {"batch": 4})[0] == 4 * _macs(one)[0]
    result = CliRunner().invoke(app, ["audit", str(four), "--json", "--bind", "batch=4"])
    doc = json.loads(result.stdout)
    assert doc["totals"]["macs_dense"] == 4 * _macs(one)[0]
    assert not [w for w in doc["warnings"] if "not a symbol" in w]


@pytest.mark.parametrize("model", ["gpt2", "vit", "convnext", "swin"])
def test_weighted_macs_equal_flop_counter(tmp_path: Path, model: str) -> None:
    """conv + linear + matmul MACs = FlopCounterMode's FLOPs / 2 (eager attention: torch counts its matmuls)."""
    case = CASES[model]
    path = export_case(case, "torchscript", tmp_path / f"{model}.onnx", attention="eager")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        build_model(case, attention="eager")(case.example(1))
    _, by_kind = _macs(path)
    weighted = sum(by_kind.get(kind, 0) for kind in ("conv", "linear", "matmul"))
    assert weighted * 2 == counter.get_total_flops()
    assert set(by_kind) - {"conv", "linear", "matmul"}, "norms, pointwise ops, adds... are counted apart"


def test_unsupported_op_names_node_and_fix(tmp_path: Path) -> None:
    """An op paic has no semantics for fails with one line naming the node and what to do."""
    import onnx
    from onnx import helper

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    w = helper.make_tensor("w", onnx.TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).reshape(-1).tolist())
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Hardmax", ["h"], ["y"], name="odd")]
    path = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 17)]), path)
    result = CliRunner().invoke(app, ["optimize", str(path), "-o", str(tmp_path / "out.onnx"), "-s", "0.5", "-m", "synflow"])
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "'odd'" in message and "no semantics for Hardmax" in message and "magnitude" in message
    assert "static input shapes" not in message  # a static export cannot fold an op of an activation


def test_dropout_exported_in_training_mode_says_to_export_after_eval(tmp_path: Path) -> None:
    """Dropout left in training mode exports as a random draw: the error says to call model.eval()."""
    import onnx
    from onnx import helper

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    w = helper.make_tensor("w", onnx.TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).reshape(-1).tolist())
    half = helper.make_tensor("half", onnx.TensorProto.FLOAT, [], [0.5])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("RandomUniformLike", ["h"], ["u"], name="drop"),
             helper.make_node("Less", ["u", "half"], ["keep"]), helper.make_node("Cast", ["keep"], ["k"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Mul", ["h", "k"], ["y"])]
    path = tmp_path / "train_mode.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w, half]), opset_imports=[helper.make_opsetid("", 17)]), path)
    result = CliRunner().invoke(app, ["optimize", str(path), "-o", str(tmp_path / "out.onnx"), "-s", "0.5", "-m", "synflow"])
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "'drop'" in message and "training mode" in message and "model.eval()" in message


def _gather_by_sizes_model(path: Path) -> Path:
    """x (N, 4) -> x @ W (W = 3 * I) -> flatten -> Gather by Range(0, 4N) (as dynamo lowers as_strided) -> y (4N,)."""
    import onnx
    from onnx import helper

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None])
    inits = [
        helper.make_tensor("w", onnx.TensorProto.FLOAT, [4, 4], (3 * np.eye(4, dtype=np.float32)).reshape(-1).tolist()),
        helper.make_tensor("flat", onnx.TensorProto.INT64, [1], [-1]),
        helper.make_tensor("zero", onnx.TensorProto.INT64, [], [0]),
        helper.make_tensor("one", onnx.TensorProto.INT64, [], [1]),
        helper.make_tensor("four", onnx.TensorProto.INT64, [], [4]),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Reshape", ["h", "flat"], ["hf"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Mul", ["n", "four"], ["n4"]),
        helper.make_node("Range", ["zero", "n4", "one"], ["positions"]),
        helper.make_node("Gather", ["hf", "positions"], ["y"], axis=0, name="strided"),
    ]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_gather_by_size_computed_indices(tmp_path: Path) -> None:
    """The indices are recomputed at the bound batch, never rescaled by the exact path scaling."""
    from pai_compiler.passes.analysis.paths import count_paths

    graph = load_onnx_model(_gather_by_sizes_model(tmp_path / "g.onnx"))
    assert {n.attrs.get("op") for n in graph.nodes if n.kind is OpKind.OPAQUE} == {"gather", "shape_data"}
    x = torch.randn(3, 4)
    torch.testing.assert_close(Interpreter(graph).run([x]).outputs[0], 3 * x.reshape(-1))
    # mask W[i, j] = i <= j: output j has j + 1 paths, 1 + 2 + 3 + 4 = 10 per sample (index
    # tensors scaled like counts would read h[0] four times: 4)
    weight = graph.prunable_params()[0]
    graph.set_mask(weight, np.triu(np.ones((4, 4), dtype=bool)))
    assert float(count_paths(graph, "exact", {"N": 1}).log_paths) == pytest.approx(np.log(10), abs=1e-9)
    assert float(count_paths(graph, "exact", {"N": 5}).log_paths) == pytest.approx(np.log(50), abs=1e-9)


@pytest.mark.parametrize("model", ["gpt2", "bert"])
def test_static_and_dynamic_exports_agree(exports: Callable[[str, Exporter], Path], model: str) -> None:
    """Positions looked up by Range(0, seq) are a constant, as the static export folds them: same
    paths and the same weighted MACs at the traced sequence length."""
    static = audit_graph(load_onnx_model(exports(model, "torchscript")))["totals"]
    dynamic = audit_graph(load_onnx_model(exports(model, "torchscript-dynamic")), bind={"seq": 8})["totals"]
    assert dynamic["log_paths"] == pytest.approx(static["log_paths"], abs=1e-9)
    for kind in ("linear", "matmul"):
        assert dynamic["macs_by_kind"][kind] == static["macs_by_kind"][kind], kind


@pytest.mark.parametrize("exporter", ["torchscript", "torchscript-dynamic"])
def test_t5_buckets_fold_and_run_without_numpy_warnings(exports: Callable[[str, Exporter], Path], exporter: Exporter) -> None:
    """T5's relative buckets take log(0) = -inf on purpose (onnxruntime does the same): folding them
    and running them at bound sizes prints no RuntimeWarning on the user's terminal."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        graph = load_onnx_model(exports("t5enc", exporter))
        assert audit_graph(graph)["totals"]["log_paths"] is not None
