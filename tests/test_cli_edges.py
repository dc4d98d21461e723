"""Edge cases of the CLI/API contract: flag checks before any work, global budgets, per-sample path counts."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from pai_compiler import api
from pai_compiler.cli import app
from pai_compiler.passes.criteria.dpai.outcome import DpaiReport
from pai_compiler.pipeline import format_pipeline

ROOT = Path(__file__).resolve().parents[1]
RESNET = ROOT / "examples" / "models" / "resnet20.onnx"


def _mlp(path: Path, batch: int | str | None, sizes: tuple[int, ...] = (6, 5, 4), seed: int = 0) -> Path:
    """A dense MatMul/Relu chain whose input (and output) leads with ``batch`` (None: no shape at all)."""
    rng = np.random.default_rng(seed)
    inits, nodes, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        inits.append(numpy_helper.from_array(rng.standard_normal((a, b)).astype(np.float32), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"]))
        prev = f"h{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    shape_in = None if batch is None else [batch, sizes[0]]
    shape_out = None if batch is None else [batch, sizes[-1]]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, shape_out)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.stderr if res.stderr_bytes is not None else res.output


def _no_loading(*args: object, **kwargs: object) -> None:
    raise AssertionError("the model was loaded before the flags were checked")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
        (["-m", "random", "-p", "erk{sparsity=0.9},magnitude{scope=layer}"], "--method and --pipeline"),
        (["-m", "magnitude", "--align", "4"], "--align applies with --compact only"),
        (["-p", "erk{sparsity=0.9},magnitude{scope=layer}", "-s", "0.5"], "--sparsity does not combine with --pipeline"),
    ],
)
def test_flag_errors_come_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: list[str], needle: str) -> None:
    monkeypatch.setattr(api, "load_model", _no_loading)
    out = tmp_path / "o.onnx"
    args = ["optimize", str(RESNET), "-o", str(out), *extra]
    if "-p" not in extra:
        args += ["-s", "0.9"]
    code, err = _run(*args)
    assert code == 2 and needle in err, err
    assert not out.exists()


def test_cuda_device_is_checked_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(api, "load_model", _no_loading)
    out = tmp_path / "o.onnx"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = _run("optimize", str(RESNET), "-s", "0.9", "-o", str(out), "--device", "cuda")
    assert code == 2 and "--device cuda: torch" in err and "sees no CUDA device" in err, err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code, err = _run("optimize", str(RESNET), "-s", "0.9", "-o", str(out), "--device", "cuda:2")
    assert code == 2 and "sees 2 CUDA device(s) (cuda:0..cuda:1)" in err, err
    api.check_device("cuda:1")  # in range: accepted
    assert not out.exists()


def test_output_format_is_checked_before_pruning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "load_model", _no_loading)
    for out, needle in [("x.pt", "a masked .pt needs a PyTorch model"), ("x.bin", "unknown output format")]:
        code, err = _run("optimize", str(RESNET), "-s", "0.9", "-m", "magnitude", "-o", str(tmp_path / out))
        assert code == 2 and needle in err, err
    code, err = _run("optimize", str(RESNET), "-s", "0.9", "-o", str(tmp_path / "m.onnx"), "--report", str(tmp_path / "m.onnx"))
    assert code == 2 and "--report" in err and not (tmp_path / "m.onnx").exists(), err


def test_global_random_keeps_the_global_budget(tmp_path: Path) -> None:
    spec = format_pipeline(api.build_passes(method="random", sparsity=0.93, allocation="global"))
    assert spec == "random{sparsity=0.93,scope=global}"
    assert format_pipeline(api.build_passes(method="magnitude", sparsity=0.93, allocation="global")) == "magnitude{sparsity=0.93}"
    result = api.optimize(RESNET, method="random", sparsity=0.93, allocation="global", seed=1)
    masks = list(result.masks.values())
    total = sum(m.size for m in masks)
    assert sum(int(m.sum()) for m in masks) == total - math.floor(0.93 * total)
    densities = {round(float(m.mean()), 2) for m in masks if m.size > 1000}
    assert len(densities) > 1  # one global draw: layers differ (a per-layer draw gives them all 7%)


def test_exclude_by_node_name_warns_about_nothing(tmp_path: Path) -> None:
    graph = api.load_model(RESNET)
    node = next(n.name for p in graph.prunable_params() for n in graph.param_users(p))
    exclusion = api.apply_exclude(graph, [node, "no-such-layer*"])
    assert len(exclusion.layers) == 1
    warnings = exclusion.warnings
    assert any("no-such-layer*" in w for w in warnings) and not any(node in w for w in warnings)


def test_paths_are_per_sample_whatever_the_static_batch(tmp_path: Path) -> None:
    from pai_compiler.audit import audit_graph

    # dense 6 -> 5 -> 4: 6 * 5 * 4 = 120 input->output paths per sample
    for batch in (1, 4, 32, "N"):
        doc = audit_graph(api.load_model(_mlp(tmp_path / f"b{batch}.onnx", batch)))
        assert doc["totals"]["log_paths"] == pytest.approx(math.log(120), abs=1e-9), batch
        assert doc["totals"]["log_paths_dpai"] == pytest.approx(doc["totals"]["log_paths"], abs=1e-9), batch
    # DPaI's own report counts per sample too
    report = api.optimize(tmp_path / "b4.onnx", sparsity=0.5, method="dpai", steps=3).report_of(DpaiReport)
    assert report is not None
    final = report.final
    assert final["log_paths_exact"] == pytest.approx(audit_graph(api.optimize(tmp_path / "b1.onnx", sparsity=0.5, method="dpai", steps=3).graph)
                                                     ["totals"]["log_paths"], abs=1e-9)
    assert final["log_paths"] == pytest.approx(final["log_paths_exact"], abs=1e-5)


def test_zero_sized_input_and_unknown_shape_are_model_errors(tmp_path: Path) -> None:
    from pai_compiler.errors import PaicError
    from pai_compiler.pass_infra import AnalysisManager
    from pai_compiler.passes.analysis.node_path import NodePathPass

    graph = api.load_model(_mlp(tmp_path / "z.onnx", 0))
    with pytest.raises(PaicError, match="'x' has a dimension of size 0"):
        AnalysisManager(graph).get(NodePathPass())
    code, err = _run("optimize", str(_mlp(tmp_path / "n.onnx", None)), "-s", "0.5", "-m", "synflow", "-o", str(tmp_path / "o.onnx"))
    assert code == 1 and "unknown shape" in err, err


def test_sliced_positional_table_loads_and_prunes(tmp_path: Path) -> None:
    """``x + pos[:, :x.shape[1]]`` (GPT/BERT style): the Slice of a constant by a run-time size is
    recomputed at the bound sizes (an ``op="shape_data"`` node, nothing opaque), the rest prunes."""
    import torch
    from torch import nn

    class Pos(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.randn(1, 16, 8))
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x + self.pos[:, : x.shape[1]])

    path = tmp_path / "pos.onnx"
    torch.onnx.export(Pos().eval(), (torch.randn(2, 5, 8),), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "N", 1: "S"}})
    result = api.optimize(path, sparsity=0.5, method="magnitude")
    assert not any("opaque" in w for w in result.warnings)
    assert [n.attrs["op"] for n in result.graph.nodes if n.kind.value == "opaque"] == ["shape_data"]
    out = tmp_path / "pruned.onnx"
    api.save_model(result, path, out)
    from pai_compiler.ort import session

    x = np.random.RandomState(0).randn(3, 7, 8).astype(np.float32)
    assert session(out).run(None, {"x": x})[0].shape == (3, 7, 4)


def test_embedding_model_from_python_to_onnx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "emb.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class E(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.e = nn.Embedding(20, 8)\n        self.fc = nn.Linear(8, 3)\n"
        "    def forward(self, idx):\n        return self.fc(self.e(idx).mean(1))\n")
    monkeypatch.chdir(tmp_path)
    code, err = _run("optimize", "emb.py:E", "--input-shape", "2,6", "-s", "0.5", "-m", "magnitude", "-o", "e.onnx", "-q")
    assert code == 0, err
    from pai_compiler.ort import session

    sess = session(tmp_path / "e.onnx")
    assert sess.run(None, {sess.get_inputs()[0].name: np.array([[1, 2, 3, 4, 5, 19]], dtype=np.int64)})[0].shape == (1, 3)


@pytest.mark.parametrize("flag", [["--input-shape", "2,3,32,32"], ["--frontend", "export"], ["--prune-tied"]])
def test_torch_only_flags_on_an_onnx_model_are_usage_errors(tmp_path: Path, flag: list[str]) -> None:
    code, err = _run("optimize", str(RESNET), "-o", str(tmp_path / "o.onnx"), "-m", "magnitude", "--sparsity", "0.9", *flag)
    assert code == 2 and flag[0] in err and "ONNX" in err


def test_overwriting_the_input_is_a_usage_error(tmp_path: Path) -> None:
    model = _mlp(tmp_path / "m.onnx", 2)
    before = model.read_bytes()
    code, err = _run("optimize", str(model), "-o", str(model), "-m", "magnitude", "--sparsity", "0.9")
    assert code == 2 and "--force" in err and model.read_bytes() == before


def test_torch_shape_error_keeps_its_cause_and_suggests_no_impossible_frontend(tmp_path: Path) -> None:
    spec = tmp_path / "m.py"
    spec.write_text("from torch import nn\n\ndef net():\n    return nn.Sequential(nn.Linear(5, 3))\n")
    for frontend in ("auto", "fx", "export"):
        code, err = _run("audit", f"{spec}:net", "--input-shape", "2,4", "--frontend", frontend)
        assert code == 1 and "(try --frontend fx)" not in err, (frontend, err)
    with pytest.raises(Exception) as info:
        api.load_model(f"{spec}:net", input_shape="2,4", frontend="export")
    assert isinstance(info.value.__cause__, Exception)  # the shape error itself, shown by --debug
    assert "4" in str(info.value.__cause__) or "shape" in str(info.value.__cause__).lower()
