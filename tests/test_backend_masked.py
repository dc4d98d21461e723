"""Masked ONNX backend: checker-valid, ORT equals the masked torch model, everything else unchanged."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pai_compiler.lab import zoo
from pai_compiler.api import optimize, save_model
from pai_compiler.ort import session

ROOT = Path(__file__).resolve().parents[1]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def masked_torch_reference(name: str, model: onnx.ModelProto) -> torch.nn.Module:
    """The zoo module loaded with the written (masked) initializers: an independent reference."""
    module = zoo.build(name).eval()
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    state = module.state_dict()
    for key in state:
        if key in inits:
            state[key] = torch.from_numpy(inits[key].copy())
    module.load_state_dict(state)
    return module


@pytest.mark.parametrize("name", ["resnet20", "vgg_small", "tiny_vit"])
def test_masked_onnx_is_faithful(tmp_path: Path, name: str) -> None:
    src = ROOT / "examples" / "models" / f"{name}.onnx"
    before = sha(src)
    result = optimize(src, sparsity=0.95, method="magnitude")
    out = tmp_path / "pruned.onnx"
    save_model(result, src, out)
    assert sha(src) == before, "the input file must never be modified"
    onnx.checker.check_model(str(out), full_check=True)
    original, pruned = onnx.load(str(src)), onnx.load(str(out))
    # graph kept node for node; opset and names unchanged
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in original.graph.node] == [
        (n.op_type, n.name, list(n.input), list(n.output)) for n in pruned.graph.node
    ]
    assert [(o.domain, o.version) for o in original.opset_import] == [(o.domain, o.version) for o in pruned.opset_import]
    # non-prunable initializers byte for byte, prunable ones = original * mask
    masks = result.masks
    assert [t.name for t in original.graph.initializer] == [t.name for t in pruned.graph.initializer]
    kept = total = 0
    for a, b in zip(original.graph.initializer, pruned.graph.initializer):
        if a.name in masks:
            wa, wb = onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b)
            assert np.array_equal(wb, np.where(masks[a.name], wa, 0))
            kept += int(np.count_nonzero(wb))
            total += wb.size
        else:
            assert a.SerializeToString() == b.SerializeToString()
    assert abs(kept / total - 0.05) <= 0.001
    meta = {p.key: p.value for p in pruned.metadata_props}
    assert meta["paic.pipeline"] == "erk{sparsity=0.95},magnitude{scope=layer}" and "paic.version" in meta
    # ORT on the written file equals the masked torch module
    x = np.random.RandomState(0).randn(4, *zoo.input_shape(name)).astype(np.float32)
    sess = session(out)
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        ref = masked_torch_reference(name, pruned)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(ref).max())))


def test_constant_of_shape_weights_are_rewritten(tmp_path: Path) -> None:
    src = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_shufflenet.onnx"
    result = optimize(src, sparsity=0.9, method="random")
    out = tmp_path / "pruned.onnx"
    save_model(result, src, out)
    onnx.checker.check_model(str(out), full_check=True)
    original, model = onnx.load(str(src)), onnx.load(str(out))
    # same positions, same output names; ConstantOfShape producers of weights became Constants
    assert [list(n.output) for n in original.graph.node] == [list(n.output) for n in model.graph.node]
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"}
    stored = {p.origin: p.data for p in result.graph.prunable_params()}
    for name, mask in result.masks.items():
        assert np.array_equal(consts[name], np.where(mask, stored[name], 0))
    sess = session(out)
    shape = [int(d) for d in result.graph.inputs[0].shape]
    sess.run(None, {sess.get_inputs()[0].name: np.random.rand(*shape).astype(np.float32)})


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    src = ROOT / "examples" / "models" / "resnet20.onnx"
    outs = []
    for i in range(2):
        result = optimize(src, sparsity=0.9, method="random", seed=3)
        outs.append(tmp_path / f"o{i}.onnx")
        save_model(result, src, outs[-1])
    assert sha(outs[0]) == sha(outs[1])
