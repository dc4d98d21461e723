"""ONNX Tile that constant folding cannot do: a count read from the input's shape (Bloom's alibi repeated
over the batch in a TorchScript export with dynamic axes) and a Tile of an activation, against onnxruntime
at several batches."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from pai_compiler.api import optimize
from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.interp import Interpreter
from pai_compiler.ort import session


def _model(path: Path) -> Path:
    """x (N, 4) -> h = x W (N, 6) -> Tile(h, [1, 2]) (N, 12) + Tile(bias (1, 12), [N, 1]) via Shape(x)[0]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((1, 12)).astype(np.float32), "bias"),
             numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "twice"),
             numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "one")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Tile", ["h", "twice"], ["wide"], name="tile_act"),
             helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
             helper.make_node("Concat", ["batch", "one"], ["reps"], axis=0),
             helper.make_node("Tile", ["bias", "reps"], ["bias_n"], name="tile_batch"),
             helper.make_node("Add", ["wide", "bias_n"], ["y"])]
    graph = helper.make_graph(nodes, "tile", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_tile_by_a_batch_count_and_of_an_activation_equals_onnxruntime(tmp_path: Path) -> None:
    src = _model(tmp_path / "tile.onnx")
    g = load_onnx_model(src)
    assert not [n.name for n in g.nodes if n.kind.value == "opaque"]
    sess = session(src, threads=1)
    for batch in (1, 2, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
        np.testing.assert_allclose(Interpreter(g).run([torch.from_numpy(x)]).outputs[0].numpy(), sess.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)
    result = optimize(g, sparsity=0.5, method="synflow")
    assert all(p.mask is not None for p in result.graph.prunable_params())
