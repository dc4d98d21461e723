"""ONNX DepthToSpace (DCR, CRD) and SpaceToDepth: reshape -> transpose -> reshape, checked against onnxruntime,
then pruned, written and compacted (a super-resolution head: conv -> DepthToSpace)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pai_compiler.api import compact_graph, optimize, save_compact, save_model
from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.interp import Interpreter
from pai_compiler.ort import session


def _model(path: Path, op: str, mode: str | None, batch: str | int = "N") -> Path:
    """x (batch, 2, 4, 4) -> conv to 8 channels -> ``op`` with block 2 -> conv to 3 channels."""
    rng = np.random.default_rng(0)
    kw = {"blocksize": 2, **({"mode": mode} if mode else {})}
    c_mid = 2 if op == "DepthToSpace" else 32
    inits = [numpy_helper.from_array(rng.standard_normal((8, 2, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((3, c_mid, 3, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node(op, ["r"], ["s"], name="move", **kw), helper.make_node("Conv", ["s", "w2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "sd", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


@pytest.mark.parametrize("op,mode", [("DepthToSpace", "DCR"), ("DepthToSpace", "CRD"), ("DepthToSpace", None), ("SpaceToDepth", None)])
def test_space_depth_equals_onnxruntime_and_prunes(tmp_path: Path, op: str, mode: str | None) -> None:
    src = _model(tmp_path / "m.onnx", op, mode)
    g = load_onnx_model(src)
    assert not [n.name for n in g.nodes if n.kind.value == "opaque"]
    sess = session(src, threads=1)
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 2, 4, 4)).astype(np.float32)
        np.testing.assert_allclose(Interpreter(g).run([torch.from_numpy(x)]).outputs[0].numpy(), sess.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)
    result = optimize(g, sparsity=0.7, method="synflow")  # paths move through the rearrangement as values do
    save_model(result, src, tmp_path / "masked.onnx")
    x = np.random.default_rng(5).standard_normal((2, 2, 4, 4)).astype(np.float32)
    masked = session(tmp_path / "masked.onnx", threads=1).run(None, {"x": x})[0]
    np.testing.assert_allclose(Interpreter(result.graph).run([torch.from_numpy(x)]).outputs[0].numpy(), masked, rtol=1e-5, atol=1e-5)
    small = result.graph.clone()
    save_compact(small, src, tmp_path / "small.onnx", compact_graph(small))
    np.testing.assert_allclose(session(tmp_path / "small.onnx", threads=1).run(None, {"x": x})[0], masked, rtol=1e-5, atol=1e-5)
