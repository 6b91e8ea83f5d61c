"""One table of tensor element types and their names in each library vitdeploy speaks to.

numpy's name is the key; KServe v2 / Triton protocol names, Triton model-config names, ONNX Runtime's
type strings and TensorRT's ``DataType`` names (as pybind prints them) all map through it, so no
module keeps its own copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vitdeploy.errors import VitDeployError


@dataclass(frozen=True)
class DType:
    numpy: str  # numpy dtype name; "bfloat16" has no numpy type
    v2: str  # KServe v2 / Triton inference protocol datatype
    triton: str  # Triton model config data_type
    ort: str  # ONNX Runtime NodeArg.type
    trt: str  # TensorRT DataType name, lower case


TABLE = (
    DType("float32", "FP32", "TYPE_FP32", "tensor(float)", "float"),
    DType("float16", "FP16", "TYPE_FP16", "tensor(float16)", "half"),
    DType("bfloat16", "BF16", "TYPE_BF16", "tensor(bfloat16)", "bf16"),
    DType("float64", "FP64", "TYPE_FP64", "tensor(double)", "double"),
    DType("uint8", "UINT8", "TYPE_UINT8", "tensor(uint8)", "uint8"),
    DType("int8", "INT8", "TYPE_INT8", "tensor(int8)", "int8"),
    DType("int32", "INT32", "TYPE_INT32", "tensor(int32)", "int32"),
    DType("int64", "INT64", "TYPE_INT64", "tensor(int64)", "int64"),
    DType("bool", "BOOL", "TYPE_BOOL", "tensor(bool)", "bool"),
)
_BY_NAME = {name: row for row in TABLE for name in (row.numpy, row.trt, row.ort, row.v2, row.triton)}


def lookup(name: str) -> DType:
    """The row for any of a type's names (numpy, v2, Triton, ONNX Runtime or TensorRT), or a clear error."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise VitDeployError(f"unknown tensor element type {name!r}: vitdeploy handles "
                             f"{', '.join(r.numpy for r in TABLE)}") from None


def to_numpy(name: str) -> np.dtype:
    """The numpy dtype for any of a type's names; bfloat16 has none and is refused."""
    row = lookup(name)
    if row.numpy == "bfloat16":
        raise VitDeployError("bfloat16 tensors have no numpy type: use float32 or float16 for inputs and outputs")
    return np.dtype(row.numpy)


def enum_name(value: object) -> str:
    """A pybind enum's member name in lower case: 'DataType.HALF' -> 'half', 'TensorIOMode.INPUT' -> 'input'."""
    return str(value).rsplit(".", 1)[-1].lower()
