"""Older ONNX opsets: TorchScript exports at opsets 9-15 and hand-built graphs in the attribute
forms exporters no longer write (Slice/Pad/Clip/Squeeze/Unsqueeze/Reduce/Split/Upsample), each
checked against onnxruntime (real semantics), pruned, written and compacted, with the audit
totals equal across opsets (same weights)."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

from pai_compiler.audit import audit_graph
from pai_compiler.cli import app
from pai_compiler.errors import PaicError
from pai_compiler.frontends.onnx import load_onnx_model
from pai_compiler.interp import Interpreter
from pai_compiler.ir import OpKind

TOTALS = ("macs_dense", "log_paths", "effective_params")


class _Tiny(nn.Module):
    """What old exporters write as attributes: pads, clip bounds, squeeze axes, split sizes, upsample scales."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.drop = nn.Dropout(0.5)
        self.fc1 = nn.Linear(8 * 9, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(F.relu6(self.c1(x)), (1, 0, 0, 1))
        x = self.up(torch.clamp(self.c2(x), -1.0, 2.0))
        x = torch.flatten(self.drop(F.avg_pool2d(x, 6)), 1).unsqueeze(1).squeeze(1)
        a, b = F.relu(self.fc1(x)).split([6, 10], dim=1)
        return F.log_softmax(self.fc2(torch.cat([b, a * 0.5], 1)), dim=-1)


def _export(path: Path, opset: int) -> Path:
    torch.manual_seed(0)
    model = _Tiny().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 8, 8),), str(path), dynamo=False, opset_version=opset, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return path


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _ours(path: Path, x: np.ndarray) -> np.ndarray:
    return Interpreter(load_onnx_model(path), mode="real").run([torch.from_numpy(x)]).outputs[0].numpy()


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))


def _totals(path: Path) -> dict[str, float]:
    document = audit_graph(load_onnx_model(path))
    return {key: document["totals"][key] for key in TOTALS}


@pytest.fixture(scope="module")
def reference_totals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    return _totals(_export(tmp_path_factory.mktemp("opset17") / "tiny17.onnx", 17))


@pytest.mark.parametrize("opset", [9, 11, 13, 15])
def test_torchscript_opsets_prune_write_and_compact(tmp_path: Path, opset: int, reference_totals: dict[str, float]) -> None:
    """Each opset: lowered without opaque nodes, pruned, the written and the compacted model equal the IR (onnxruntime)."""
    src = _export(tmp_path / "tiny.onnx", opset)
    assert [n.attrs["reason"] for n in load_onnx_model(src).nodes if n.kind is OpKind.OPAQUE and "reason" in n.attrs] == []
    assert _totals(src) == pytest.approx(reference_totals, rel=1e-12)
    x = np.random.default_rng(opset).standard_normal((3, 3, 8, 8)).astype(np.float32)
    assert _rel(_ours(src, x), _ort(src, x)) <= 1e-5
    runner = CliRunner()
    pruned, small = tmp_path / "pruned.onnx", tmp_path / "small.onnx"
    result = runner.invoke(app, ["optimize", str(src), "-s", "0.9", "-m", "synflow", "-o", str(pruned), "-q"])
    assert result.exit_code == 0, result.output
    assert _rel(_ours(pruned, x), _ort(pruned, x)) <= 1e-5
    result = runner.invoke(app, ["compact", str(pruned), "-o", str(small), "-q"])
    assert result.exit_code == 0, result.output
    assert _rel(_ort(small, x), _ort(pruned, x)) <= 1e-5


# ---- hand-built graphs: the attribute forms of older opsets -------------------------------------

def _model(path: Path, nodes: list[onnx.NodeProto], in_shape: list[int | str], opset: int, inits: list[onnx.TensorProto] | None = None) -> Path:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits or [])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7), str(path))
    return path


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _float(name: str, value: float | list[float]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


Case = tuple[list[onnx.NodeProto], list[int | str], int, list[onnx.TensorProto]]
CASES: dict[str, Callable[[], Case]] = {
    # before opset 13, (Log)Softmax works on the input coerced to 2-D at axis (default 1)
    "softmax11_axis1": lambda: ([helper.make_node("Softmax", ["X"], ["Y"], axis=1)], ["N", 3, 4], 11, []),
    "softmax11_default": lambda: ([helper.make_node("Softmax", ["X"], ["Y"])], [2, 3, 4], 11, []),
    "logsoftmax9_axis1": lambda: ([helper.make_node("LogSoftmax", ["X"], ["Y"], axis=1)], [2, 3, 2, 2], 9, []),
    "softmax11_axis0": lambda: ([helper.make_node("Softmax", ["X"], ["Y"], axis=0)], [2, 3], 11, []),
    "softmax11_trailing_ones": lambda: ([helper.make_node("Softmax", ["X"], ["Y"], axis=1)], [2, 3, 1], 11, []),
    "pad2_attrs": lambda: ([helper.make_node("Pad", ["X"], ["Y"], pads=[0, 0, 1, 2, 0, 0, 2, -1])], [1, 2, 3, 3], 9, []),
    "pad18_axes": lambda: ([helper.make_node("Pad", ["X", "p", "", "a"], ["Y"])], [1, 2, 3, 3], 18, [_ints("p", [1, 0, 2, 3]), _ints("a", [-1, 2])]),
    "squeeze11_axes": lambda: ([helper.make_node("Squeeze", ["X"], ["Y"], axes=[-1, 1])], [2, 1, 3, 1], 11, []),
    "unsqueeze11_axes": lambda: ([helper.make_node("Unsqueeze", ["X"], ["Y"], axes=[0, -1])], [2, 3], 11, []),
    "slice9_attrs": lambda: ([helper.make_node("Slice", ["X"], ["Y"], starts=[1, -3], ends=[1000, -1], axes=[1, 2])], [2, 4, 5], 9, []),
    "reducemean11_axes": lambda: ([helper.make_node("ReduceMean", ["X"], ["Y"], axes=[-1, 1], keepdims=0)], [2, 3, 4], 11, []),
    "reducesum11_axes": lambda: ([helper.make_node("ReduceSum", ["X"], ["Y"], axes=[2])], [2, 3, 4], 11, []),
    "split11_sizes": lambda: ([helper.make_node("Split", ["X"], ["a", "b"], axis=1, split=[1, 3]),
                               helper.make_node("Concat", ["b", "a"], ["Y"], axis=1)], [2, 4, 3], 11, []),
    "split18_num_outputs": lambda: ([helper.make_node("Split", ["X"], ["a", "b", "c"], axis=2, num_outputs=3),
                                     helper.make_node("Concat", ["c", "a", "b"], ["Y"], axis=2)], [2, 4, 7], 18, []),
    "clip6_attrs": lambda: ([helper.make_node("Clip", ["X"], ["Y"], min=-0.5, max=0.25)], [2, 5], 10, []),
    "clip11_max_only": lambda: ([helper.make_node("Clip", ["X", "", "hi"], ["Y"])], [2, 5], 11, [_float("hi", 0.5)]),
    "upsample7_scales_attr": lambda: ([helper.make_node("Upsample", ["X"], ["Y"], scales=[1.0, 1.0, 2.0, 3.0], mode="nearest")], [1, 2, 3, 3], 7, []),
    "upsample9_linear": lambda: ([helper.make_node("Upsample", ["X", "s"], ["Y"], mode="linear")], [1, 2, 3, 3], 9, [_float("s", [1, 1, 2, 2])]),
    "resize10_linear": lambda: ([helper.make_node("Resize", ["X", "s"], ["Y"], mode="linear")], [1, 2, 3, 4], 10, [_float("s", [1, 1, 2, 1.5])]),
    "dropout10_ratio": lambda: ([helper.make_node("Dropout", ["X"], ["Y"], ratio=0.3)], [2, 3], 10, []),
    # Slice-1 of a run-time shape: TorchScript's opset-9 reshape(batch, ...) on a dynamic batch
    "slice9_of_shape": lambda: ([helper.make_node("Shape", ["X"], ["s"]), helper.make_node("Slice", ["s"], ["n"], starts=[0], ends=[1], axes=[0]),
                                 helper.make_node("Concat", ["n", "minus1"], ["t"], axis=0), helper.make_node("Reshape", ["X", "t"], ["Y"])],
                                ["N", 3, 4], 9, [_ints("minus1", [-1])]),
    "slice9_of_sized_ones": lambda: ([helper.make_node("Shape", ["X"], ["s"]), helper.make_node("ConstantOfShape", ["s"], ["o"], value=_float("one", [1.5])),
                                      helper.make_node("Slice", ["o"], ["a"], starts=[1], ends=[3], axes=[1]),
                                      helper.make_node("Slice", ["X"], ["b"], starts=[1], ends=[3], axes=[1]), helper.make_node("Mul", ["a", "b"], ["Y"])],
                                     ["N", 4], 9, []),
    # ReduceProd of a constant over some axes (was folded over all of them)
    "reduceprod11_axes_of_constant": lambda: ([helper.make_node("ReduceProd", ["c"], ["p"], axes=[1], keepdims=0), helper.make_node("Add", ["X", "p"], ["Y"])],
                                              ["N", 2], 11, [_float("c", [[1.0, 2.0, 3.0], [0.5, 0.5, 4.0]])]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_attribute_forms_match_onnxruntime(tmp_path: Path, case: str) -> None:
    nodes, in_shape, opset, inits = CASES[case]()
    path = _model(tmp_path / f"{case}.onnx", nodes, in_shape, opset, inits)
    graph = load_onnx_model(path)
    assert [n.attrs["reason"] for n in graph.nodes if n.kind is OpKind.OPAQUE and "reason" in n.attrs] == []  # none without semantics
    x = np.random.default_rng(0).standard_normal([2 if isinstance(d, str) else d for d in in_shape]).astype(np.float32)
    assert _rel(_ours(path, x), _ort(path, x)) <= 1e-5


@pytest.mark.parametrize("pad", ["value_attr", "value_input", "reflect"])
def test_pad_other_than_zeros_names_node_and_fix(tmp_path: Path, pad: str) -> None:
    """Pad-2's ``value`` attribute was ignored (zeros padded silently); any non-zero pad is refused in one line."""
    node, inits, opset = {
        "value_attr": (helper.make_node("Pad", ["X"], ["Y"], name="pad0", pads=[0, 0, 1, 1, 0, 0, 1, 1], value=0.5), [], 9),
        "value_input": (helper.make_node("Pad", ["X", "p", "v"], ["Y"], name="pad0"), [_ints("p", [0, 0, 1, 1, 0, 0, 1, 1]), _float("v", 0.5)], 11),
        "reflect": (helper.make_node("Pad", ["X"], ["Y"], name="pad0", pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="reflect"), [], 9),
    }[pad]
    path = _model(tmp_path / "pad.onnx", [node], [1, 2, 3, 3], opset, inits)
    with pytest.raises(PaicError, match=r"'pad0'.*Pad with (value 0.5|mode 'reflect').*pad with zeros"):
        Interpreter(load_onnx_model(path), mode="real").run([torch.zeros(1, 2, 3, 3)])


def test_softmax11_between_convs_prunes_and_compacts(tmp_path: Path) -> None:
    """The 2-D softmax of opset 11 (a reshape around a softmax in the IR) writes and compacts node for node."""
    rng = np.random.default_rng(0)
    inits = [_float("w1", rng.standard_normal((8, 3, 3, 3)).tolist()), _float("w2", rng.standard_normal((6, 8, 1, 1)).tolist())]
    nodes = [helper.make_node("Conv", ["X", "w1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Softmax", ["a"], ["b"], axis=1),
             helper.make_node("Conv", ["b", "w2"], ["Y"])]
    src = _model(tmp_path / "sm.onnx", nodes, ["N", 3, 5, 5], 11, inits)
    pruned, small = tmp_path / "pruned.onnx", tmp_path / "small.onnx"
    runner = CliRunner()
    assert runner.invoke(app, ["optimize", str(src), "-s", "0.5", "-m", "synflow", "-o", str(pruned), "-q"]).exit_code == 0
    assert runner.invoke(app, ["compact", str(pruned), "-o", str(small), "-q"]).exit_code == 0
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    assert _rel(_ours(pruned, x), _ort(pruned, x)) <= 1e-5
    assert _rel(_ort(small, x), _ort(pruned, x)) <= 1e-5


@pytest.mark.parametrize("op_type", ["Hardmax", "ReduceMin", "ReduceL1", "ReduceSumSquare", "ReduceLogSumExp", "LpNormalization"])
def test_op_without_semantics_says_so(tmp_path: Path, op_type: str) -> None:
    """An op paic cannot run is named with the fix that works (no forward pass), not 're-export with static shapes'."""
    path = _model(tmp_path / "op.onnx", [helper.make_node(op_type, ["X"], ["Y"], name="op0", axis=1) if op_type in ("Hardmax", "LpNormalization")
                                         else helper.make_node(op_type, ["X"], ["Y"], name="op0", axes=[1])], [2, 3, 4], 11)
    with pytest.raises(PaicError, match=rf"'op0'.*no semantics for {op_type}.*no forward pass") as info:
        Interpreter(load_onnx_model(path), mode="real").run([torch.zeros(2, 3, 4)])
    assert "static input shapes" not in str(info.value)
