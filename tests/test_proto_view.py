"""The wire-level ModelProto view reads what onnx itself reads: attributes, types, initializers, errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from pai_compiler.cli import app
from pai_compiler.errors import ModelError
from pai_compiler.frontends.onnx.proto_view import attribute_value, read_model, view_of
from pai_compiler.frontends.onnx.reader import import_onnx, load_onnx_model


def _odd_model() -> onnx.ModelProto:
    """Every attribute type the view decodes, one it hands to onnx (a graph), odd dims and tensors."""
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [2, 2], [1.5, -2.0, 3.25, 0.0])  # float_data, no raw
    raw = numpy_helper.from_array(np.arange(6, dtype=np.int64).reshape(2, 3) - 3, "raw")
    node = helper.make_node(
        "Custom", ["x", "", "w"], ["y", "z"], name="odd", domain="ai.onnx",
        f=0.1, i=-7, s="héllo", t=raw, typed=typed, floats=[1.0, -0.5, 1e-30], ints=[-1, 0, 2**40, -(2**62)],
        strings=["a", "bé"], g=then,
    )
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, None, 0]),
              helper.make_tensor_value_info("u", TensorProto.INT64, None)]
    weights = [numpy_helper.from_array(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "w"),
               helper.make_tensor("h", TensorProto.FLOAT16, [2], np.array([1.0, 2.0], np.float16).view(np.uint16).tolist())]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], initializer=weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.x", 2)])


def test_view_reads_what_onnx_reads() -> None:
    model = _odd_model()
    view = view_of(model.SerializeToString())
    assert view.ir_version == model.ir_version
    assert view.opset_import == [("", 18), ("com.x", 2)]
    assert view.graph is not None and view.graph.name == "g"
    node, proto = view.graph.node[0], model.graph.node[0]
    assert (node.name, node.op_type, node.domain, node.input, node.output) == ("odd", "Custom", "ai.onnx", ["x", "", "w"], ["y", "z"])
    for attr, want in zip(node.attribute, proto.attribute, strict=True):
        assert attr.name == want.name and attr.type == want.type
        got, expected = attribute_value(node, attr), helper.get_attribute_value(want)
        if want.type == want.TENSOR:
            expected = numpy_helper.to_array(expected)
            assert got.dtype == expected.dtype and np.array_equal(got, expected)
        else:
            assert got == expected, want.name
    x, u = view.graph.input
    assert (x.name, x.is_tensor, x.elem_type, x.dims) == ("x", True, TensorProto.FLOAT, ["batch", 3, "", 0])
    assert (u.name, u.elem_type, u.dims) == ("u", TensorProto.INT64, None)
    assert [t.name for t in view.graph.initializer] == ["w", "h"]


def test_weights_are_views_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_odd_model(), str(path))
    view, arrays = read_model(path)
    assert np.array_equal(arrays["w"], np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4))
    assert not arrays["w"].flags.writeable and arrays["w"].base is not None
    assert "h" not in arrays  # float16 given as int32_data: onnx decodes it (tensor_array)


def test_model_proto_and_file_lower_alike(tmp_path: Path) -> None:
    src = Path(__file__).resolve().parents[1] / "examples" / "models" / "tiny_vit.onnx"
    from pai_compiler.ir import to_text

    assert to_text(load_onnx_model(src)) == to_text(import_onnx(onnx.load(str(src)), name=src.stem))


@pytest.mark.parametrize("data", [b"\x0a\xff\xff", b"\x3a\x05\x0a\x01", b"\x0b\x00"])
def test_malformed_bytes_are_one_line_model_errors(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(data)
    with pytest.raises(ModelError, match="not a valid ONNX model") as info:
        read_model(path)
    assert "\n" not in str(info.value)


def _conv_model(weight: TensorProto) -> onnx.ModelProto:
    """One Conv named 'conv0' reading the initializer ``weight`` (name 'w', shape 16x3x3x3)."""
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv0", kernel_shape=[3, 3])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _raw_weight(data_type: int, itemsize: int) -> TensorProto:
    tensor = TensorProto()
    tensor.name, tensor.data_type = "w", data_type
    tensor.dims.extend([16, 3, 3, 3])
    tensor.raw_data = b"\0" * (16 * 27 * itemsize)
    return tensor


def _cli_error(path: Path) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["audit", str(path)])
    return res.exit_code, res.stderr if res.stderr_bytes is not None else res.output


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6, 0.9, 0.999])
def test_truncated_file_is_a_one_line_error_with_the_fix(tmp_path: Path, fraction: float) -> None:
    whole = _conv_model(numpy_helper.from_array(np.ones((16, 3, 3, 3), np.float32), "w")).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(whole[:max(1, int(len(whole) * fraction))])
    code, err = _cli_error(path)
    assert code == 1 and "not a valid ONNX model" in err and "re-export" in err and "cut.onnx" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("data_type", [0, 99])
def test_unknown_dtype_names_the_tensor(tmp_path: Path, data_type: int) -> None:
    path = tmp_path / "dtype.onnx"
    onnx.save(_conv_model(_raw_weight(data_type, 4)), str(path))
    code, err = _cli_error(path)
    assert code == 1 and "tensor 'w'" in err and f"data type {data_type}" in err and "re-export" in err, err
    assert err.count("\n") == 1


def test_raw_data_of_the_wrong_size_names_the_tensor(tmp_path: Path) -> None:
    weight = _raw_weight(TensorProto.FLOAT, 4)
    weight.raw_data = b"\0" * 100
    path = tmp_path / "short.onnx"
    onnx.save(_conv_model(weight), str(path))
    code, err = _cli_error(path)
    assert code == 1 and "tensor 'w'" in err and "raw_data has 100 bytes" in err and "re-export" in err, err


def test_external_data_errors_name_the_tensor_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "missing.onnx"
    weight = numpy_helper.from_array(np.ones((16, 3, 3, 3), np.float32), "w")
    onnx.save(_conv_model(weight), str(missing), save_as_external_data=True, location="missing.data", size_threshold=0)
    (tmp_path / "missing.data").unlink()
    code, err = _cli_error(missing)
    assert code == 1 and "tensor 'w'" in err and "missing.data" in err and "copy it there" in err, err
    exotic = tmp_path / "bf16.onnx"
    onnx.save(_conv_model(_raw_weight(TensorProto.BFLOAT16, 2)), str(exotic), save_as_external_data=True,
              location="bf16.data", size_threshold=0)
    code, err = _cli_error(exotic)
    assert code == 1 and "tensor 'w'" in err and "type 16 is not supported" in err and "inside the model file" in err, err


def test_cast_to_an_unknown_type_names_the_node(tmp_path: Path) -> None:
    cast = helper.make_node("Cast", ["x"], ["y"], name="cast0", to=99)
    graph = helper.make_graph([cast], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    path = tmp_path / "cast.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    code, err = _cli_error(path)
    assert code == 1 and "node 'cast0' (Cast)" in err and "data type 99" in err and "re-export" in err, err


def test_string_weight_is_named_as_a_string_tensor(tmp_path: Path) -> None:
    weight = helper.make_tensor("w", TensorProto.STRING, [16, 3, 3, 3], [b"a"] * (16 * 27))
    path = tmp_path / "string.onnx"
    onnx.save(_conv_model(weight), str(path))
    code, err = _cli_error(path)
    assert code == 1 and "conv0" in err and "a string tensor is used as tensor data" in err and "numeric tensor" in err, err
    assert err.count("\n") == 1 and "symbolic" not in err
