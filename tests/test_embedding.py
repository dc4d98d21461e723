"""Embedding lookups: one IR node in every frontend, evaluated by the interpreter in both modes.

* ``nn.Embedding`` / ``F.embedding`` (torch.fx, torch.export) and ``Gather(table, indices)``
  with a constant table and dynamic integer indices (ONNX, TorchScript and dynamo exporters)
  lower to the same node: ``opaque`` with ``op="embedding"``, the indices as input, the table a
  dense non-prunable ``table`` Param, the table's float dtype (torch.fx said int64), no warning.
* real mode is ONNX Gather (any axis, negative indices), equal to onnxruntime and to torch;
  paths mode makes each output element one path source, whatever the indices.
* audit totals agree across the four lowerings and with a brute-force path enumeration; dpai,
  synflow, snip and grasp (``--data random`` draws indices) run, and the written model
  computes in onnxruntime what the interpreter computes with the masks.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from pai_compiler import api
from pai_compiler.audit import audit_graph
from pai_compiler.lab.data import RANDOM_DATA, load_batch_for
from pai_compiler.errors import PaicError
from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.frontends.torch.export import lower_export
from pai_compiler.frontends.torch.fx import lower_fx
from pai_compiler.interp import Interpreter
from pai_compiler.ir import Graph, OpKind
from pai_compiler.ort import session

PATH_KEYS = ("log_paths", "log_paths_dpai", "effective_params", "effective_nodes", "effective_nodes_npb",
             "effective_kernels", "total_nodes", "macs_dense", "macs_nonzero", "macs_effective")
SEQ, VOCAB, DIM = 6, 50, 16

MODELS_PY = '''
import torch
from torch import nn


class EmbMean(nn.Module):
    """Embedding(50, 16) -> mean over the sequence -> Linear(16, 8) -> ReLU -> Linear(8, 4)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Embedding(50, 16)
        self.fc1, self.fc2 = nn.Linear(16, 8), nn.Linear(8, 4)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.e(idx).mean(1))))


class EmbFlat(nn.Module):
    """Embedding(50, 16) -> flatten -> Linear(96, 8) -> ReLU -> Linear(8, 4)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.e = nn.Embedding(50, 16)
        self.fc1, self.fc2 = nn.Linear(6 * 16, 8), nn.Linear(8, 4)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.e(idx).flatten(1))))
'''
_NS: dict[str, Any] = {}
exec(compile(MODELS_PY, "<embedding models>", "exec"), _NS)  # the same source the CLI test imports
EmbMean, EmbFlat = _NS["EmbMean"], _NS["EmbFlat"]
MODELS = {"mean": EmbMean, "flat": EmbFlat}
FRONTENDS = ("fx", "export", "ts", "dynamo")


def _has_onnxscript() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def _quiet() -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def _example() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Each model exported by the TorchScript exporter and (with onnxscript) the dynamo one."""
    root = tmp_path_factory.mktemp("embedding")
    files: dict[tuple[str, str], Path] = {}
    for key, cls in MODELS.items():
        model = cls().eval()
        path = root / f"{key}_ts.onnx"
        with _quiet():
            torch.onnx.export(model, (_example(),), str(path), dynamo=False, opset_version=17, input_names=["idx"],
                              output_names=["y"], dynamic_axes={"idx": {0: "N"}, "y": {0: "N"}})
        files[key, "ts"] = path
        if _has_onnxscript():
            path = root / f"{key}_dynamo.onnx"
            with _quiet():
                torch.onnx.export(model, (_example(),), str(path), dynamo=True, input_names=["idx"], output_names=["y"],
                                  dynamic_shapes=({0: torch.export.Dim("N")},))
            files[key, "dynamo"] = path
    return files


def _lower(key: str, frontend: str, files: dict[tuple[str, str], Path]) -> Graph:
    if frontend == "fx":
        return lower_fx(MODELS[key]().eval(), (_example(),))
    if frontend == "export":
        with _quiet():
            return lower_export(MODELS[key]().eval(), (_example(),))
    if (key, frontend) not in files:
        pytest.skip("onnxscript is not installed")
    return load_onnx_model(files[key, frontend])


def _lookup(g: Graph) -> Any:
    (node,) = [n for n in g.nodes if n.kind is OpKind.OPAQUE]
    return node


# ---- lowering ------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(MODELS))
def test_every_frontend_lowers_the_same_lookup(key: str, onnx_files: dict[tuple[str, str], Path]) -> None:
    table = MODELS[key]().e.weight.detach().numpy()
    signatures = []
    for frontend in FRONTENDS:
        if frontend == "dynamo" and not _has_onnxscript():
            continue
        g = _lower(key, frontend, onnx_files)
        node = _lookup(g)
        assert node.attrs["op"] == "embedding" and node.attrs["axis"] == 0, frontend
        assert [v.dtype for v in node.inputs] == ["int64"] and node.inputs[0].producer.kind is OpKind.INPUT
        out = node.outputs[0]
        assert out.dtype == "float32", frontend  # the table's dtype (torch.fx used to say int64)
        assert [str(d) for d in out.shape[1:]] == [str(SEQ), str(DIM)]
        (p,) = node.params.values()
        assert not p.prunable and p.name == "e.weight" and np.array_equal(p.data, table)
        assert [p.name for p in g.prunable_params()] == ["fc1.weight", "fc2.weight"]
        assert not g.meta["warnings"], (frontend, g.meta["warnings"])
        signatures.append([(n.kind, n.attrs.get("op"), n.outputs[0].dtype if n.outputs else None) for n in g.nodes])
    assert all(s == signatures[0] for s in signatures[1:])


def test_fx_opaque_embedding_keeps_the_table_dtype() -> None:
    class MaxNorm(nn.Module):  # max_norm rewrites the table: left opaque, with the right dtype
        def __init__(self) -> None:
            super().__init__()
            self.e, self.fc = nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 2)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.fc(self.e(idx))

    g = lower_fx(MaxNorm().eval(), (torch.randint(0, 10, (2, 3)),))
    node = _lookup(g)
    assert "op" not in node.attrs and node.outputs[0].dtype == "float32"
    assert any("max_norm" in w for w in g.meta["warnings"])


# ---- interpreter ---------------------------------------------------------------------------------
def _gather_model(path: Path, axis: int) -> np.ndarray:
    table = np.random.RandomState(0).randn(4, 5, 3).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "idx"], ["g"], axis=axis), helper.make_node("Relu", ["g"], ["y"])]
    graph = helper.make_graph(nodes, "gather", [helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(table, "table")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return table


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_real_mode_is_onnx_gather(tmp_path: Path, axis: int) -> None:
    path = tmp_path / "gather.onnx"
    table = _gather_model(path, axis)
    n = table.shape[axis]
    idx = np.array([[0, -1], [n - 1, -n], [1, 0]], dtype=np.int64)  # negative indices count from the end
    g = load_onnx_model(path)
    node = _lookup(g)
    assert node.attrs == {"op": "embedding", "axis": axis % 3, "op_type": "Gather", "domain": ""}
    want = session(path).run(None, {"idx": idx})[0]
    got = Interpreter(g).run([torch.from_numpy(idx)]).outputs[0].numpy()
    assert got.shape == want.shape and np.allclose(got, want)
    with pytest.raises(PaicError, match="indices run"):
        Interpreter(g).run([torch.tensor([[0, n]])])


def test_real_mode_matches_torch_and_paths_mode_is_a_path_source() -> None:
    model = EmbMean().eval()
    g = lower_fx(model, (_example(),))
    idx = torch.randint(0, VOCAB, (5, SEQ), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.allclose(Interpreter(g).run([idx]).outputs[0], model(idx), atol=1e-6)
    it = Interpreter(g, mode="paths", dtype=torch.float64)
    lookup = it.run([idx]).values[_lookup(g).outputs[0].name]
    assert lookup.dtype == torch.float64 and lookup.shape == (5, SEQ, DIM) and bool((lookup == 1).all())
    other = Interpreter(g, mode="paths", dtype=torch.float64).run([torch.ones(5, SEQ)]).outputs[0]  # indices are never read
    assert torch.equal(other, it.run([idx]).outputs[0])
    ones = Interpreter(g, lookup="ones").run([idx]).outputs  # SynFlow's lookup: all ones in real mode
    with torch.no_grad():
        assert torch.allclose(ones[0], model.fc2(torch.relu(model.fc1(torch.ones(5, DIM)))), atol=1e-6)


# ---- audit -----------------------------------------------------------------------------------------
def _masks(key: str) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(3)
    fan_in = DIM if key == "mean" else SEQ * DIM
    m1 = rng.rand(8, fan_in) < 0.3
    m1[5] = False  # a dead hidden unit: its fc2 column is kept but not effective
    m2 = rng.rand(4, 8) < 0.5
    m2[:, 2] = False  # a hidden unit nobody reads: its fc1 row is kept but not effective
    return {"fc1.weight": m1, "fc2.weight": m2}


def _brute_force(key: str, masks: dict[str, np.ndarray]) -> dict[str, Any]:
    """Enumerate every input-element -> output-element path of one sample through kept weights."""
    m1, m2 = masks["fc1.weight"], masks["fc2.weight"]
    paths, on_path1, on_path2 = 0, np.zeros_like(m1), np.zeros_like(m2)
    for s, c, h, o in itertools.product(range(SEQ), range(DIM), range(8), range(4)):
        i = c if key == "mean" else s * DIM + c  # the mean sums every position into channel c
        if m1[h, i] and m2[o, h]:
            paths += 1
            on_path1[h, i] = on_path2[o, h] = True
    return {
        "log_paths": math.log(paths),
        "effective_params": int(on_path1.sum() + on_path2.sum()),
        "effective_nodes": int(on_path1.any(axis=1).sum() + on_path2.any(axis=1).sum()),
        "effective_kernels": int(on_path1.sum() + on_path2.sum()),
        "total_nodes": 12,
    }


@pytest.mark.parametrize("key", list(MODELS))
def test_audit_totals_agree_across_frontends_and_with_brute_force(key: str, onnx_files: dict[tuple[str, str], Path]) -> None:
    masks = _masks(key)
    totals = {}
    for frontend in FRONTENDS:
        if frontend == "dynamo" and not _has_onnxscript():
            continue
        g = _lower(key, frontend, onnx_files)
        for p in g.prunable_params():
            g.set_mask(p, masks[p.name])
        doc = audit_graph(g)
        assert not doc["warnings"], (frontend, doc["warnings"])
        totals[frontend] = {k: doc["totals"][k] for k in PATH_KEYS}
    first = totals["fx"]
    for frontend, t in totals.items():
        for k in PATH_KEYS:
            assert t[k] == pytest.approx(first[k], rel=1e-12), (frontend, k)
    for k, v in _brute_force(key, masks).items():
        assert first[k] == pytest.approx(v, rel=1e-12), k


def test_cli_audit_json_agrees_for_onnx_and_torch(tmp_path: Path, onnx_files: dict[tuple[str, str], Path]) -> None:
    from typer.testing import CliRunner

    from pai_compiler.cli import app

    (tmp_path / "emb_models.py").write_text(MODELS_PY)
    runs = {
        "onnx": ["audit", str(onnx_files["mean", "ts"]), "--json"],
        "fx": ["audit", f"{tmp_path / 'emb_models.py'}:EmbMean", "--input-shape", f"2,{SEQ}", "--json"],  # integer example
    }
    docs = {}
    for name, args in runs.items():
        result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        docs[name] = json.loads(result.stdout)
    assert docs["onnx"]["totals"]["log_paths"] == pytest.approx(math.log(SEQ * DIM * 8 * 4))
    for k in PATH_KEYS:
        assert docs["fx"]["totals"][k] == pytest.approx(docs["onnx"]["totals"][k]), k


# ---- pruning -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dpai", "synflow", "snip", "grasp"])
def test_methods_prune_and_the_written_model_matches_the_interpreter(tmp_path: Path, method: str,
                                                                     onnx_files: dict[tuple[str, str], Path]) -> None:
    path = onnx_files["flat", "ts"]
    data = load_batch_for(load_onnx_model(path), RANDOM_DATA, samples_per_class=2) if method in ("snip", "grasp") else None
    result = api.optimize(str(path), sparsity=0.8, method=method, steps=20 if method == "dpai" else None, data=data)
    masks = {p.name: p.mask for p in result.graph.prunable_params()}
    assert all(m is not None for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == pytest.approx(0.2 * (96 * 8 + 8 * 4), abs=2)
    out = tmp_path / f"{method}.onnx"
    api.save_model(result, path, out)
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert np.array_equal(weights["e.weight"], EmbFlat().e.weight.detach().numpy())  # the table is written as it was
    feed = np.random.RandomState(4).randint(-VOCAB, VOCAB, (3, SEQ)).astype(np.int64)
    want = session(out).run(None, {"idx": feed})[0]
    got = Interpreter(result.graph).run([torch.from_numpy(feed)]).outputs[0].numpy()
    assert np.allclose(got, want, atol=1e-5)
    doc = audit_graph(result.graph)
    assert doc["totals"]["log_paths"] is not None and not doc["warnings"]


def test_random_prune_batch_holds_valid_indices(onnx_files: dict[tuple[str, str], Path]) -> None:
    batch = load_batch_for(load_onnx_model(onnx_files["mean", "ts"]), RANDOM_DATA, samples_per_class=3)
    assert batch.x.dtype == np.int64 and batch.x.shape == (12, SEQ) and 0 <= batch.x.min() and batch.x.max() < VOCAB
    assert sorted(batch.y.tolist()) == sorted([0, 1, 2, 3] * 3)


def _int_input_model(tmp_path: Path, *, also_indexes: bool) -> Path:
    """x (int64, 1x3) cast to float and multiplied by W; with ``also_indexes`` x also picks rows of a table."""
    rng = np.random.RandomState(0)
    w, table = rng.randn(3, 2).astype(np.float32), rng.randn(5, 2).astype(np.float32)
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["xf", "w"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])]
    inits = [numpy_helper.from_array(w, "w")]
    if also_indexes:
        nodes.append(helper.make_node("Gather", ["table", "x"], ["e"]))
        outputs.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 3, 2]))
        inits.append(numpy_helper.from_array(table, "table"))
    graph = helper.make_graph(nodes, "intin", [helper.make_tensor_value_info("x", TensorProto.INT64, [1, 3])], outputs,
                              initializer=inits)
    path = tmp_path / f"intin_{also_indexes}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_integer_input_that_picks_no_row_gets_synflow_ones(tmp_path: Path) -> None:
    """An integer input that indexes no table (an attention mask, or plain integer data) is fed
    SynFlow's all-ones input like a float one."""
    result = api.optimize(str(_int_input_model(tmp_path, also_indexes=False)), sparsity=0.5, method="synflow")
    assert sum(p.kept() for p in result.graph.prunable_params()) == 3


def test_integer_input_used_as_indices_and_as_data_is_refused_by_synflow(tmp_path: Path) -> None:
    with pytest.raises(PaicError, match="embedding lookups"):
        api.optimize(str(_int_input_model(tmp_path, also_indexes=True)), sparsity=0.5, method="synflow")
