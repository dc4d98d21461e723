"""Streaming ONNX I/O (pai_compiler.onnx_wire): mapped weights equal onnx's own reading, the
streamed masked model equals the load-edit-save one, external data stays external and valid."""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pai_compiler.api import optimize, save_model
from pai_compiler.backends import onnx_masked
from pai_compiler.errors import ModelError
from pai_compiler.onnx_wire import STRIP_BYTES, open_model
from pai_compiler.ort import session

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["resnet20", "vgg_small", "tiny_vit"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _canonical(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the explicit default data_location the load-edit-save path writes."""
    for t in model.graph.initializer:
        if t.data_location == TensorProto.DEFAULT:
            t.ClearField("data_location")
    return model


@pytest.mark.parametrize("name", EXAMPLES)
def test_open_model_views_equal_onnx_load(name: str) -> None:
    path = ROOT / "examples" / "models" / f"{name}.onnx"
    wire = open_model(path)
    full = onnx.load(str(path))
    stripped = 0
    for t in full.graph.initializer:
        expected = numpy_helper.to_array(t)
        if len(t.raw_data) >= STRIP_BYTES:
            stripped += 1
            got = wire.arrays[t.name]
            assert got.dtype == expected.dtype and np.array_equal(got, expected) and not got.flags.writeable
        else:
            assert t.name not in wire.arrays
    assert stripped > 0
    # the skeleton is the model minus the big raw_data, nothing else
    for t in full.graph.initializer:
        if len(t.raw_data) >= STRIP_BYTES:
            t.ClearField("raw_data")
    assert wire.model == full


@pytest.mark.parametrize("name", EXAMPLES)
def test_streamed_equals_loaded_path(tmp_path: Path, name: str) -> None:
    src = ROOT / "examples" / "models" / f"{name}.onnx"
    result = optimize(src, sparsity=0.9, method="magnitude")
    onnx_masked.write_masked_onnx(result.graph, src, tmp_path / "a.onnx", pipeline=result.pipeline)
    onnx_masked._write_loaded(result.graph, src, tmp_path / "b.onnx", pipeline=result.pipeline, check=True)
    assert _canonical(onnx.load(str(tmp_path / "a.onnx"))) == _canonical(onnx.load(str(tmp_path / "b.onnx")))


def test_reoptimizing_replaces_metadata_and_files_are_readable(tmp_path: Path) -> None:
    src = ROOT / "examples" / "models" / "vgg_small.onnx"
    once, twice = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    for a, b, sparsity in ((src, once, 0.5), (once, twice, 0.9)):
        result = optimize(a, sparsity=sparsity, method="magnitude")
        save_model(result, a, b)
    keys = [p.key for p in onnx.load(str(twice)).metadata_props]
    assert sorted(keys) == ["paic.pipeline", "paic.version"]
    assert "sparsity=0.9" in {p.key: p.value for p in onnx.load(str(twice)).metadata_props}["paic.pipeline"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(twice.stat().st_mode) == 0o666 & ~umask


def _external_mlp(folder: Path) -> Path:
    """Two Gemm layers with external data (one tensor below the alignment threshold) and a small inline bias."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 300), dtype=np.float32)
    w2 = rng.standard_normal((10, 64), dtype=np.float32)
    b = rng.standard_normal(10, dtype=np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1, name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b"], ["y"], transB=1, name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 300])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b, "b")])
    path = folder / "mlp.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=1024)
    return path


def test_external_data_stays_external_and_runs(tmp_path: Path) -> None:
    src = _external_mlp(tmp_path)
    before = (sha(src), sha(tmp_path / "weights.bin"))
    result = optimize(src, sparsity=0.75, method="magnitude")
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    save_model(result, src, out)
    assert (sha(src), sha(tmp_path / "weights.bin")) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]
    onnx.checker.check_model(str(out), full_check=True)
    model = onnx.load(str(out), load_external_data=False)
    locations = {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert set(locations) == {"w1", "w2"} and all(e["location"] == "pruned.onnx.data" for e in locations.values())
    assert int(locations["w1"]["offset"]) % 64 == 0 and int(locations["w2"]["offset"]) % 64 == 0
    loaded = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
    masks = result.masks
    for name in ("w1", "w2"):
        assert np.array_equal(loaded[name], np.where(masks[name], original[name], 0))
    assert np.array_equal(loaded["b"], original["b"])
    x = np.random.default_rng(1).standard_normal((3, 300), dtype=np.float32)
    y = session(out).run(None, {"x": x})[0]
    ref = np.maximum(x @ loaded["w1"].T, 0) @ loaded["w2"].T + loaded["b"]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("damage", "needle"),
    [("short_data", "do not hold"), ("escape", "relative path inside"), ("missing", "missing external data")],
)
def test_bad_external_data_is_refused(tmp_path: Path, damage: str, needle: str) -> None:
    src = _external_mlp(tmp_path)
    data = tmp_path / "weights.bin"
    if damage == "short_data":
        data.write_bytes(data.read_bytes()[:1000])
    elif damage == "missing":
        data.unlink()
    else:
        model = onnx.load(str(src), load_external_data=False)
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = "../weights.bin"
        src.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match=needle):
        from pai_compiler.api import load_model

        load_model(src)


def test_streamed_output_failing_the_checker_is_not_left_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = ROOT / "examples" / "models" / "vgg_small.onnx"
    real = onnx.checker.check_model
    seen = []

    def picky(model: object, *args: object, **kwargs: object) -> None:
        seen.append(str(model))
        if str(model).endswith(".check.onnx"):  # the written model's check skeleton
            raise onnx.checker.ValidationError("simulated: broken output")
        real(model, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx.checker, "check_model", picky)
    result = optimize(src, sparsity=0.9, method="magnitude")
    with pytest.raises(Exception, match="fails onnx.checker: simulated"):
        save_model(result, src, tmp_path / "o.onnx")
    assert list(tmp_path.iterdir()) == [] and len(seen) == 2  # skeleton, then the source (which passes)


def test_bfloat16_weights_round_trip(tmp_path: Path) -> None:
    """A dtype numpy lacks (bfloat16, read through ml_dtypes) stays in the proto and streams back unchanged in type."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    w = np.random.default_rng(0).standard_normal((64, 256)).astype(ml_dtypes.bfloat16)  # 32 KiB > STRIP_BYTES
    t = TensorProto()
    t.name, t.data_type, t.raw_data = "w", TensorProto.BFLOAT16, w.tobytes()
    t.dims.extend(w.shape)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["n", 256])], [t])
    src, out = tmp_path / "bf16.onnx", tmp_path / "out.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(src))
    assert "w" not in open_model(src).arrays
    result = optimize(src, sparsity=0.5, method="magnitude")
    save_model(result, src, out)
    got = onnx.load(str(out)).graph.initializer[0]
    assert got.data_type == TensorProto.BFLOAT16
    values = numpy_helper.to_array(got)
    assert np.array_equal(values, np.where(result.masks["w"], w, 0).astype(ml_dtypes.bfloat16))
    assert np.count_nonzero(values) == w.size // 2
