"""The one dtype table agrees with the libraries it names."""

from __future__ import annotations

import numpy as np
import pytest

from vitdeploy import dtypes
from vitdeploy.errors import VitDeployError


def test_names_round_trip_through_the_table():
    for row in dtypes.TABLE:
        for name in (row.numpy, row.v2, row.triton, row.ort, row.trt):
            assert dtypes.lookup(name) is row
    assert dtypes.to_numpy("half") == np.float16 and dtypes.to_numpy("FP32") == np.float32
    with pytest.raises(VitDeployError, match="bfloat16"):
        dtypes.to_numpy("BF16")
    with pytest.raises(VitDeployError, match="unknown tensor element type 'fp4'"):
        dtypes.lookup("fp4")


def test_v2_names_are_tritonclients():
    from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

    for row in dtypes.TABLE:
        if row.numpy != "bfloat16":
            assert np_to_triton_dtype(np.dtype(row.numpy)) == row.v2
            assert np.dtype(triton_to_np_dtype(row.v2)) == np.dtype(row.numpy)


def test_triton_names_are_model_config_enum_members():
    from tritonclient.grpc import model_config_pb2

    for row in dtypes.TABLE:
        model_config_pb2.DataType.Value(row.triton)  # raises for a name Triton does not know


def test_ort_names_are_onnxruntimes():
    import onnxruntime as ort
    from onnx import helper

    for row in dtypes.TABLE:
        if row.numpy == "bfloat16":
            continue
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(row.numpy))
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", elem, [1])],
                                  [helper.make_tensor_value_info("y", elem, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        assert sess.get_inputs()[0].type == row.ort


def test_enum_name():
    class E:
        def __str__(self) -> str:
            return "DataType.HALF"

    assert dtypes.enum_name(E()) == "half"
