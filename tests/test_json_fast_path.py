"""The fast path for large JSON tensors (vitdeploy.serving.parsing.json_with_tensor / number_array) against
the reference it replaces, json.loads + np.asarray(dtype): the same values bit for bit, the same shapes and
dtypes, and never an array where the reference refuses; and through /v1 and /v2 request parsing, the same
answer or the same 400, with the fast path on and off."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitdeploy.serving import parsing
from vitdeploy.serving.errors import HTTPFailure

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64)]
SPECIAL = ["-0", "-0.0", "0", "0.0", "1e-45", "1.4e-45", "1E5", "1e+05", "1E-0", "5e-324", "1e309", "-1e400",
           "0.1e1", "3.4028235e38", "3.4028236e38", "65520", "9007199254740993", "-9007199254740993",
           "123456789012345678901234567890", "1" + "0" * 400, "0.30000000000000004", "2.5e-8", "1e22", "1e23",
           "4.9406564584124654e-324", "1." + "0" * 40 + "1", "0e400", "-0e-400", "1e0000000000000000000005",
           "0.0000000000000000000000001", "-9999999999999999999999.5", "18446744073709551617", "-1e-22", "9e22"]
HOSTILE = ["01", "-01", "00", "1.", ".5", "+1", "1e", "1e+", "NaN", "Infinity", "-Infinity", "1.2.3", "1e2.3",
           "1e2e3", "0x1", "\u0661", "1_000", "--1", "", "1 2", "1,", "[]", "true", "null", '"1"', "1\f", "-",
           "1e-", "1.e5", "-.5", "\u00b2", "1\\u0030", "{}"]


def reference(text: str, dtype: np.dtype) -> np.ndarray | str:
    """What the server did before the fast path: json.loads, then np.asarray in the type read."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return "not JSON"
    try:
        return np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError, RecursionError):
        return "not numbers"


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def check(text: str, dtype: np.dtype) -> np.ndarray | None:
    """number_array agrees with the reference wherever it answers; its answer (None: left to json.loads)."""
    fast = parsing.number_array(text.encode(), dtype)
    if fast is not None:
        ref = reference(text, dtype)
        assert isinstance(ref, np.ndarray), (text[:200], ref)
        assert same(fast, ref), (text[:200], fast.ravel()[:8], ref.ravel()[:8])
    return fast


numbers = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
    st.tuples(st.floats(-1e6, 1e6, allow_nan=False), st.integers(0, 20), st.sampled_from("efE")).map(
        lambda t: f"{t[0]:.{t[1]}{t[2]}}"),
    st.sampled_from(SPECIAL))
separators = st.sampled_from([",", ", ", " , ", ",\n  ", "\t,\r\n"])
padding = st.sampled_from(["", " ", "\n", "\t", "\r\n  "])


@st.composite
def regular(draw: Any, tokens: st.SearchStrategy[str] = numbers) -> str:
    """A regular nested array of number tokens, in one of the whitespace styles clients use."""
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    leaves = draw(st.lists(tokens, min_size=math.prod(shape), max_size=math.prod(shape)))
    sep, pad = draw(separators), draw(padding)

    def render(level: int, at: int) -> str:
        if level == len(shape):
            return leaves[at]
        step = math.prod(shape[level + 1:])
        return "[" + pad + sep.join(render(level + 1, at + i * step) for i in range(shape[level])) + pad + "]"

    return render(0, 0)


@SETTINGS
@given(regular(), st.sampled_from(DTYPES))
def test_regular_arrays_match_json_loads(text: str, dtype: np.dtype) -> None:
    fast = check(text, dtype)
    integers = re.findall(r"(?<![\d.eE+-])-?\d+(?![\d.eE])", text)
    spaces = re.search(r"[^\[,\s]\s", text) is None  # whitespace after '[' or ',' only (json.dumps' ", ")
    short = len(text) <= 19 * (text.count(",") + 1)  # not mostly 16-digit numbers
    if spaces and short and all(len(i) <= 15 for i in integers):  # longer integers: Python ints to np.asarray
        assert fast is not None, text[:200]  # the common forms take the fast path


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 2**54) | st.integers(2**52, 2**54), st.integers(-40, 40), st.integers(0, 25),
                          st.booleans()), min_size=1, max_size=64))
def test_exact_at_the_edges_of_the_fast_path(parts: list[tuple[int, int, int, bool]]) -> None:
    """Mantissas up to 2**54 and exponents past +-22 (where M * 10**q is no longer one rounding), as float64:
    where a double rounding would show."""
    tokens = []
    for mantissa, exponent, point, negative in parts:
        digits = str(mantissa).rjust(point + 1, "0")
        number = digits if not point else f"{digits[:-point]}.{digits[-point:]}"
        tokens.append(("-" if negative else "") + number + (f"e{exponent}" if exponent else ""))
    check("[" + ",".join(tokens) + "]", np.dtype(np.float64))  # the int 9007199254740993: left to json.loads
    short = "[" + ",".join(tokens + ["0"] * (3 * len(tokens))) + "]"  # not mostly long numbers: read here
    assert check(short, np.dtype(np.float64)) is not None or re.search(r"(^|[\[,])-?\d{16,}(,|\])", short)


trees = st.recursive(st.sampled_from(SPECIAL[:12] + HOSTILE) | numbers,
                     lambda kids: st.lists(kids, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"), max_leaves=24)


@SETTINGS
@given(trees, st.sampled_from(DTYPES))
def test_ragged_and_hostile_trees_never_differ(text: str, dtype: np.dtype) -> None:
    check(text, dtype)


@SETTINGS
@given(regular(), st.data(), st.sampled_from(DTYPES))
def test_mutated_arrays_never_differ(text: str, data: Any, dtype: np.dtype) -> None:
    """Bytes inserted, replaced or removed anywhere: a fast answer always equals json.loads + np.asarray."""
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(text)))
        piece = data.draw(st.sampled_from([*HOSTILE, "[", "]", ",", "0", "-", ".", "e", " ", "\n"]))
        cut = data.draw(st.integers(0, 2))
        text = text[:at] + piece + text[at + cut:]
    check(text, dtype)


@pytest.mark.parametrize("text", [f"[{t}]" for t in HOSTILE] + [f"[[1,2],[{t}]]" for t in HOSTILE] + [
    "[1,2,]", "[,1]", "[[1,2],[3]]", "[[1,2],3]", "[[[1]],[2]]", "[1 2]", "[1\f,2]", "[" * 40 + "1" + "]" * 40,
    "[[1,2][3,4]]", "[[1,2]3,[4,5]]", "[1]]", "[[1]", "[1e5.5]", "[-0]", "[00.5]", "[1E+2,1e-2]"])
def test_hostile_examples(text: str) -> None:
    for dtype in DTYPES:
        fast = check(text, dtype)
        if not isinstance(reference(text, dtype), np.ndarray):
            assert fast is None


def test_negative_zero_as_int_and_as_float() -> None:
    x = parsing.number_array(b"[-0, -0.0, -0e0, 0]", np.dtype(np.float32))
    assert x is not None and np.signbit(x).tolist() == [False, True, True, False]


# -- whole documents: the array found where it is expected, and nowhere else ---------------------------------
V1 = (("inputs",), np.dtype(np.float32))
V2 = (("inputs", 0, "data"), np.dtype(np.float32))


def documents_agree(body: bytes, tensor: parsing.TensorAt) -> None:
    doc = parsing.json_with_tensor(body, len(body), tensor)
    if doc is None:
        return
    ref = json.loads(body.decode())  # a fast document means the whole body is JSON
    path, dtype = tensor
    holder, ref_holder = doc, ref
    for key in path[:-1]:
        holder, ref_holder = holder[key], ref_holder[key]
    assert same(holder[path[-1]], np.asarray(ref_holder[path[-1]], dtype))
    holder[path[-1]] = ref_holder[path[-1]] = None
    assert doc == ref


contexts = st.sampled_from([
    '{"inputs": %s}', '{"inputs":%s}', '{"inputs": %s, "inputs": [1]}', '{"inputs": [1], "inputs": %s}',
    '{"x": "%s", "inputs": [1]}', '{"x": "\\"%s", "inputs": [1]}', '{"inputs": %s, "y": "\\u0001tensor"}',
    '{"inputs": "\\u0001tensor", "x": %s}', '{"inputs": [%s]}', '{"inputs": %s}}', '{"inputs": %s 5}',
    '{"inputs": %s, "n": NaN}', '["inputs", %s]', '{"inputs": {"a": %s}}', ' \ufeff{"inputs": %s}',
    '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": %s}], "id": "data"}',
    '{"id": "inputs", "inputs": [{"data": %s, "data": [1]}]}', '{"inputs": [{"data": "%s"}]}'])


@SETTINGS
@given(contexts, regular(), st.sampled_from([V1, V2]))
def test_documents_match_json_loads(context: str, array: str, tensor: parsing.TensorAt) -> None:
    parsing.TENSOR_MIN_BYTES, saved = 0, parsing.TENSOR_MIN_BYTES
    try:
        documents_agree((context % array).encode(), tensor)
    finally:
        parsing.TENSOR_MIN_BYTES = saved


def test_large_bodies_take_the_fast_path() -> None:
    rng = np.random.default_rng(0)
    x = ((rng.integers(0, 256, (1, 3, 224, 224)) - 127.5) / 127.5).round(4)
    for sep in (None, (",", ":")):
        body = json.dumps({"inputs": x.tolist()}, separators=sep).encode()
        for buffer in (body, bytearray(body)):  # an inflated (gzip) body is a bytearray
            doc = parsing.json_with_tensor(buffer, len(buffer), V1)
            assert doc is not None and same(doc["inputs"], np.asarray(json.loads(body)["inputs"], np.float32))
        v2 = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 224, 224],
                                     "data": x.ravel().tolist()}]}, separators=sep).encode()
        doc = parsing.json_with_tensor(v2, len(v2), V2)
        assert doc is not None and same(doc["inputs"][0]["data"], np.asarray(x.ravel(), np.float32))


# -- through the request parsers: the same answer, or the same 400, with the fast path on and off ----------
def _model(dtype: str) -> parsing.ModelIO:
    from vitdeploy.engines.base import InputSpec

    spec = InputSpec("x", dtype, (2, 2), 1, 4)
    return parsing.ModelIO(spec, "x", "logits", {"float32": "FP32", "uint8": "UINT8"}[dtype], 4)


def _answer(parse: Any) -> Any:
    from vitdeploy.serving.limits import Lease, MemoryBudget

    intake = parsing.Intake(MemoryBudget(1 << 30), 1 << 30, 10.0, 10.0)
    try:
        out = parse(Lease(intake.budget), intake)
    except HTTPFailure as e:
        return e.code, e.reason, e.message
    x = out.x if isinstance(out, parsing.V2Request) else out
    return x.dtype.str, x.shape, x.tobytes()


def _both_ways(parse: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(parsing, "TENSOR_MIN_BYTES", 0)
        fast = _answer(parse)
    with monkeypatch.context() as m:
        m.setattr(parsing, "json_with_tensor", lambda *a: None)
        slow = _answer(parse)
    assert fast == slow


pixels = st.sampled_from(["0", "255", "3.0", "3.5", "-0", "-0.0", "256", "1e2", "2.55E2", "01", "NaN", "1e400"])


@SETTINGS
@given(st.data(), st.sampled_from(["float32", "uint8"]), st.integers(1, 5))
def test_v1_and_v2_answers_do_not_change(data: Any, dtype: str, rows: int) -> None:
    monkeypatch = pytest.MonkeyPatch()
    model = _model(dtype)
    leaves = data.draw(st.lists(pixels | numbers, min_size=4 * rows, max_size=4 * rows))
    nested = "[" + ",".join("[[{},{}],[{},{}]]".format(*leaves[4 * i:4 * i + 4]) for i in range(rows)) + "]"
    v1 = f'{{"inputs": {nested}}}'.encode()
    _both_ways(lambda lease, intake: parsing.decode_tensor(parsing.Body([v1]), None, model, lease, intake),
               monkeypatch)
    flat = "[" + ",".join(leaves) + "]"
    v2 = json.dumps({"inputs": [{"name": "x", "datatype": model.datatype, "shape": [rows, 2, 2], "data": 0}]})
    v2 = v2.replace('"data": 0', f'"data": {flat}').encode()
    _both_ways(lambda lease, intake: parsing.parse_v2_request(parsing.Body([v2]), {}, model, lease, intake),
               monkeypatch)


@pytest.mark.parametrize("leaf", ['"12"', "true", "false", '"nan"', "null", "[1]", "1" + "0" * 30])
@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_a_json_tensor_holds_numbers_only(leaf: str, dtype: str) -> None:
    """A string, a boolean, a null, a nested list or an integer beyond int64 among the values is a 400 on both
    routes: numpy alone read "12" and true as 12.0 and 1.0 (the fast path leaves these bodies to json.loads)."""
    model = _model(dtype)
    values = ",".join([leaf, "1", "2", "3"])
    v1 = f'{{"inputs": [[[{leaf}, 1], [2, 3]]]}}'.encode()
    assert _answer(lambda lease, intake: parsing.decode_tensor(parsing.Body([v1]), None, model, lease,
                                                              intake))[0] == 400
    v2 = json.dumps({"inputs": [{"name": "x", "datatype": model.datatype, "shape": [1, 2, 2], "data": 0}]})
    v2 = v2.replace('"data": 0', f'"data": [{values}]').encode()
    assert _answer(lambda lease, intake: parsing.parse_v2_request(parsing.Body([v2]), {}, model, lease,
                                                                 intake))[0] == 400
