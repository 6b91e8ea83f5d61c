"""Reading and checking requests, and encoding answers, for `vitdeploy serve`: bodies read within the
limits (:class:`Intake`: size, idle time, the request's deadline, the memory budget), v1 tensors and
images, KServe v2 requests with the binary tensor extension, and JSON that never holds NaN.

Everything here is CPU work that runs in a worker thread (:meth:`Intake.cpu`), never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from vitdeploy import dtypes
from vitdeploy.engines.base import Runtime
from vitdeploy.serving.batcher import Pieces
from vitdeploy.serving.errors import HTTPFailure, bad_input
from vitdeploy.serving.limits import Lease, MemoryBudget, MiB, json_cost, upfront_cost
from vitdeploy.sysinfo import usable_cpus

log = logging.getLogger("vitdeploy.serve")

INFLATE_STEP = 1 << 20
# numpy dtype name -> KServe v2 datatype
V2_DATATYPES = {r.numpy: r.v2 for r in dtypes.TABLE}  # numpy name -> KServe v2 datatype (the one table)


class ModelIO:
    """What a request is checked against: the input spec, tensor names, v2 datatype and batch limit;
    and what answers name: the labels (``num_labels`` is -1 when the artifact does not say), the task and
    the output's size per image (the artifact's metadata; -1 when it does not say)."""

    def __init__(self, spec: Any, input_name: str, output_name: str, datatype: str, max_batch: int,
                 labels: list[str] | None = None, num_labels: int = -1, task: str = "classification",
                 output_size: int | None = None, normalized: bool = False) -> None:
        self.spec, self.input_name, self.output_name = spec, input_name, output_name
        self.datatype, self.max_batch = datatype, max_batch
        self.dtype = np.dtype(spec.dtype)  # every request's tensor is made this type as it is parsed
        self.shape = tuple(int(d) for d in spec.shape)
        self.labels, self.num_labels = labels or [], num_labels
        self.task, self.normalized = task, normalized
        self.output_size = num_labels if output_size is None else output_size

    @classmethod
    def of(cls, runtime: Runtime, max_batch: int) -> ModelIO:
        spec, labels, meta = runtime.spec, list(runtime.labels), runtime.metadata
        num_labels = len(labels) or int((meta.config if meta else {}).get("num_labels", -1))
        if meta is not None and meta.is_embedding:
            num_labels = -1  # an embedding model has no labels, whatever its config's num_labels says
        return cls(spec, spec.name, runtime.output_name or "logits", V2_DATATYPES.get(spec.dtype, spec.dtype.upper()),
                   max_batch, labels, num_labels, meta.task if meta else "classification",
                   meta.output_size if meta else None, bool(meta and meta.normalized))

    @property
    def is_embedding(self) -> bool:
        return self.task == "embedding"

    def check_rows(self, rows: int) -> None:
        if not 1 <= rows <= self.max_batch:
            raise bad_input(f"a request holds 1..{self.max_batch} images, got {rows}")


class Intake:
    """Reads request bodies within the limits: size, idle time, the request's deadline and the memory budget."""

    def __init__(self, budget: MemoryBudget, body_limit: int, body_timeout: float, request_timeout: float) -> None:
        import anyio

        self.budget, self.body_limit = budget, body_limit
        self.body_timeout, self.request_timeout = body_timeout, request_timeout
        # decoding, inflating and parsing run in one thread per CPU but one (left to the event loop): more would
        # only queue for the GIL and the cores, and a /healthz probe would wait behind every runnable thread
        self.cpu_slots = anyio.CapacityLimiter(max(1, usable_cpus() - 1))

    async def cpu(self, func: Callable[..., Any], *args: Any) -> Any:
        """``func(*args)`` in a worker thread, within the CPU slots."""
        import functools

        import anyio.to_thread

        return await anyio.to_thread.run_sync(functools.partial(func, *args), limiter=self.cpu_slots)

    def settle(self, lease: Lease, total: int, what: str) -> None:
        """The exact cost is known: hold ``total`` bytes, giving back what the up-front estimate held beyond it."""
        if total <= lease.held:
            lease.shrink_to(total)
        else:
            self.charge(lease, total, what)

    def charge(self, lease: Lease, total: int, what: str) -> None:
        """Hold ``total`` bytes for this request (not waiting: a request holding memory never waits for more)."""
        if lease.grow_to(total):
            return
        if not lease.fits(total):
            raise HTTPFailure(413, "too_large", f"{what} would take about {total / MiB:.0f} MiB, over this server's "
                              f"memory budget of {self.budget.capacity / MiB:.0f} MiB (--memory-budget): "
                              f"send a smaller request")
        raise HTTPFailure(503, "memory", f"the server's memory budget is in use by other requests ({what} needs "
                          f"{total / MiB:.0f} MiB): retry", {"Retry-After": "1"})

    async def read_body(self, request: Any, lease: Lease, start: float) -> bytes | bytearray:
        """The whole body (inflated), charged to ``lease``; 408 when the client stalls, 413 when too large."""
        return (await self.read_chunks(request, lease, start)).joined()

    async def read_chunks(self, request: Any, lease: Lease, start: float) -> Body:
        """The whole body (inflated) as it was read, in chunks: :meth:`read_body` without joining them."""
        declared = content_length(request.headers)
        if declared is not None and declared > self.body_limit:
            raise HTTPFailure(413, "too_large", f"request body over {self.body_limit} bytes")
        if declared is None:
            first = min(self.body_limit, INFLATE_STEP)
        else:
            first = min(upfront_cost(declared, request.headers.get("content-type", ""),
                                     request.headers.get("content-encoding")), self.budget.capacity)
            if not lease.fits(declared):
                self.charge(lease, declared, "this body")
        remaining = self.request_timeout - (time.perf_counter() - start)
        if not await lease.reserve(first, max(0.0, remaining)):
            raise HTTPFailure(503, "memory", "the server's memory budget is in use by other requests: retry",
                              {"Retry-After": "1"})
        body = await self._receive_all(request, lease, start)
        encoding = request.headers.get("content-encoding")
        if encoding and encoding != "identity":
            return Body([await self.cpu(inflate, body.joined(), encoding, self, lease)])
        return body

    async def _receive_all(self, request: Any, lease: Lease, start: float) -> Body:
        """The body's chunks, as they came (a growing buffer would copy what it holds each time it outgrows its
        allocation). 408 when no byte comes for ``body_timeout`` or the body is not all in by the request's
        deadline (one timer for both)."""
        watch = _BodyWatch(self.body_timeout, self.request_timeout - (time.perf_counter() - start))
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                message = await request.receive()
                watch.progress()
                if message["type"] == "http.disconnect":
                    raise HTTPFailure(499, "disconnected", "the client disconnected before sending its body")
                chunk = message.get("body", b"")
                if chunk:
                    chunks.append(chunk)
                    size += len(chunk)
                if size > self.body_limit:
                    raise HTTPFailure(413, "too_large", f"request body over {self.body_limit} bytes",
                                      {"Connection": "close"})
                # the chunks, and a joined copy for the moment both exist
                self.charge(lease, max(lease.held, size if len(chunks) < 2 else 2 * size), "this body")
                if not message.get("more_body", False):
                    return Body(chunks)
        except asyncio.CancelledError:
            if watch.fired is None:
                raise
            watch.uncancel()
            what = (f"no data for {self.body_timeout:g} s" if watch.fired == "idle"
                    else f"not all sent within the {self.request_timeout:g} s request timeout")
            raise HTTPFailure(408, "body_timeout", f"request body {what}: the connection is closed",
                              {"Connection": "close"}) from None
        finally:
            watch.stop()


class Body:
    """A request body as the chunks it was read in. Joined only where a parser needs one buffer (and then in
    a worker thread where it can be): a binary tensor goes from its chunks into the batch that runs it."""

    __slots__ = ("chunks", "size")

    def __init__(self, chunks: list[Any]) -> None:
        self.chunks, self.size = chunks, sum(len(c) for c in chunks)

    def __len__(self) -> int:
        return self.size

    def joined(self) -> bytes | bytearray:
        """The body as one buffer: one copy, none for a body of one chunk. The joined buffer replaces the
        chunks, so that the body is not held twice (what the memory budget is charged for)."""
        if len(self.chunks) != 1:
            self.chunks = [b"".join(self.chunks)]
        return self.chunks[0]

    def prefix(self, end: int) -> bytes | bytearray:
        """The first ``end`` bytes: the whole body joined (:meth:`joined`), or a copy of the leading chunks
        that hold them (none when the first chunk holds them all)."""
        if end >= self.size:
            return self.joined()
        first = self.chunks[0]
        if end <= len(first):
            return first if end == len(first) else first[:end]
        parts, held = [], 0
        for chunk in self.chunks:
            parts.append(chunk)
            held += len(chunk)
            if held >= end:
                break
        return b"".join(parts)[:end]

    def views(self, start: int) -> list[memoryview]:
        """The bytes from ``start`` on, as views of the chunks (no copy)."""
        views, offset = [], 0
        for chunk in self.chunks:
            if offset + len(chunk) > start:
                views.append(memoryview(chunk)[max(0, start - offset):])
            offset += len(chunk)
        return views


class _BodyWatch:
    """A body's two limits with one timer for the whole body, not one per chunk: it cancels the reading task
    when no byte has come for ``idle`` seconds, or ``left`` seconds have passed; :attr:`fired` says which."""

    def __init__(self, idle: float, left: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        now = self.loop.time()
        self.idle, self.end, self.last = idle, now + max(0.0, left), now
        self.fired: str | None = None
        self.handle = self.loop.call_at(min(now + idle, self.end), self._check)

    def progress(self) -> None:
        self.last = self.loop.time()

    def _check(self) -> None:
        due = min(self.last + self.idle, self.end)
        if self.loop.time() < due:
            self.handle = self.loop.call_at(due, self._check)
            return
        self.fired = "idle" if due < self.end else "deadline"
        if self.task is not None:
            self.task.cancel()

    def uncancel(self) -> None:
        """Take back the cancellation this watch made (3.11+ counts them), so the request can answer."""
        if self.task is not None and sys.version_info >= (3, 11):
            self.task.uncancel()

    def stop(self) -> None:
        self.handle.cancel()


def _digits(raw: str, limit: int = 18) -> int | None:
    """A non-negative decimal integer of ASCII digits only (``isdigit`` alone accepts '²'), or None."""
    raw = raw.strip()
    if not raw or len(raw) > limit or not raw.isascii() or not raw.isdigit():
        return None
    return int(raw)


def content_length(headers: Any) -> int | None:
    raw = headers.get("content-length")
    return None if raw is None else _digits(raw)


def top_k(raw: str | None, num_labels: int) -> int:
    if raw is None:
        return min(5, num_labels)
    k = _digits(raw, 9)
    if k is None or k < 1:
        raise bad_input(f"top_k {raw[:20]!r} is not a whole number of at least 1")
    return min(k, num_labels)


def binary_dims(raw: str | None, shape: tuple[int, ...], max_batch: int) -> tuple[int, ...]:
    """X-Shape checked before the body is read: [n, *shape] or shape, n within the batch limit."""
    if not raw:
        raise bad_input("binary tensors need an X-Shape header such as 4,3,224,224")
    dims = tuple(_digits(v, 9) for v in raw.split(",")[:8])
    if not dims or any(d is None or d < 1 for d in dims) or len(raw.split(",")) > 8:
        raise bad_input(f"X-Shape {raw[:60]!r} needs positive sizes, such as 4,3,224,224")
    full = dims if len(dims) == len(shape) + 1 else (1, *dims)
    if tuple(full[1:]) != shape:
        raise bad_input(f"tensor shape {dims} does not match the model's [n, {', '.join(map(str, shape))}]")
    if full[0] > max_batch:
        raise bad_input(f"a request holds 1..{max_batch} images, got {full[0]}")
    return dims  # type: ignore[return-value]


def json_bytes(payload: Any) -> bytes:
    """JSON, never with NaN or Infinity in it (not JSON): a model answering those is broken."""
    try:
        return json.dumps(payload, allow_nan=False).encode()
    except ValueError:
        raise HTTPFailure(500, "non_finite_output", "the model answered NaN or infinite scores: this artifact "
                          "is broken; the server log has the details") from None


def json_load(body: bytes | bytearray, end: int, lease: Lease, intake: Intake, what: str,
              size: int | None = None, tensor: TensorAt | None = None) -> Any:
    """Parse ``body[:end]`` once its worst-case cost (beside the whole body's ``size`` bytes, ``len(body)`` by
    default) fits the memory budget; deep nesting is a 400, not a 500. ``tensor``: where a large array of
    numbers is expected, read by :func:`json_with_tensor` (the same document, the array already an ndarray)."""
    intake.settle(lease, (len(body) if size is None else size) + json_cost(body, end), what)
    if tensor is not None and (doc := json_with_tensor(body, end, tensor)) is not None:
        return doc
    try:
        # JSON between systems is UTF-8 (RFC 8259): decoding it here makes one str of the text's size, where
        # json.loads would guess UTF-16/32 from leading zero bytes and build a 4-byte-a-char buffer first
        return json.loads((body if end == len(body) else body[:end]).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad_input(f"{what} is not valid JSON") from None
    except RecursionError:
        raise bad_input(f"{what} is nested too deeply") from None


# -- large JSON tensors, read by numpy ---------------------------------------------------------------------
# json.loads makes a Python float per number and holds the GIL throughout (~20 ms for a 224x224x3 body), and
# np.asarray walks those floats again: a few such clients stall everyone's event loop. The array part of the
# text is checked against JSON's grammar with byte tables and parsed into integers by numpy (no Python object a
# number), and the rest of the document, with a placeholder string where the array was, by json.loads. Anything
# unusual (escapes, ragged or empty arrays, deep nesting, long integers, many long decimals) goes to json.loads:
# every answer is the one json.loads + np.asarray gives (tests/test_json_fast_path.py).
TensorAt = tuple[tuple[str | int, ...], np.dtype]  # the array's place in the document, and the dtype it is read as
TENSOR_MIN_BYTES = 1 << 16  # smaller arrays are cheap for json.loads
TENSOR_MAX_DEPTH = 32
SLOW_NUMBERS = 1024  # numbers outside the exact fast path parsed one by one (float()), at most this many a slice
CHUNK_BYTES = 1 << 16
_PLACEHOLDER = "\x01tensor"  # only ours: the body holds no backslash, and json.loads refuses a raw control byte
_WHITESPACE = b" \t\n\r"  # JSON's
_NUMBER_BYTES = b"0123456789+-.eE"
_POW10 = np.array([float(f"1e{i}") for i in range(23)])  # exact doubles: one rounding in M * 10**q (Clinger)
_E_TO_COMMA = bytes.maketrans(b"eE", b",,")


def _byte_tables() -> tuple[bytes, bytes, bytes, bytes]:
    """bytes.translate tables (no index array, where ndarray.take makes one of 8 bytes an index): 1 for a byte
    outside any numeric array, 1 for ',.eE', each byte's kind (0: none), and the valid pairs of kinds in a
    whitespace-free JSON array of numbers, as ``16 * first + second``."""
    kinds = {b"[": "open", b"]": "close", b",": "comma", b"-": "minus", b"+": "plus", b".": "dot", b"e": "exp",
             b"E": "exp", **{bytes([c]): "digit" for c in range(ord("0"), ord("9") + 1)}}
    after = {"open": {"open", "minus", "digit"}, "comma": {"open", "minus", "digit"}, "close": {"close", "comma"},
             "minus": {"digit"}, "plus": {"digit"}, "dot": {"digit"}, "exp": {"minus", "plus", "digit"},
             "digit": {"digit", "dot", "exp", "comma", "close"}}
    number = list(after)  # kind k is number.index(k) + 1
    inside = b"[]," + _NUMBER_BYTES + _WHITESPACE
    outside = bytes(int(c not in inside) for c in range(256))
    marks = bytes(int(c in b",.eE") for c in range(256))
    kinds.update({bytes([c]): "open" for c in _WHITESPACE})  # see _pairs_valid
    kind = bytes(number.index(kinds[bytes([c])]) + 1 if bytes([c]) in kinds else 0 for c in range(256))
    valid = bytes(16 * (number.index(a) + 1) + number.index(b) + 1 for a in after for b in after[a])
    return outside, marks, kind, valid


_OUTSIDE, _MARKS, _KIND, _VALID_PAIRS = _byte_tables()


def json_with_tensor(body: bytes | bytearray, end: int, tensor: TensorAt) -> Any:
    """``json.loads(body[:end])`` with the array at ``tensor``'s path already ``np.asarray(.., dtype)``, when
    the body's largest numeric array is there and reads exactly; None (parse it the usual way) otherwise."""
    path, dtype = tensor
    if np.dtype(dtype).kind != "f" or (span := _array_span(body, end)) is None or body.find(b"\\", 0, end) >= 0:
        return None  # with no backslash, a quote always opens or closes a string
    start, stop = span
    if body.count(b'"', 0, start) % 2:
        return None  # inside a string
    x = number_array(body, np.dtype(dtype), start, stop)
    if x is None:
        return None
    rest = bytes(body[:start]) + b'"\\u0001tensor"' + bytes(body[stop:end])
    if rest.count(b"[") + rest.count(b"{") > 100:
        return None  # might nest too deeply beside the array
    try:
        doc = json.loads(rest.decode("utf-8"))
    except (ValueError, RecursionError):
        return None  # json.loads says what is wrong, in its own words
    holder = doc
    for key in path[:-1]:
        holder = _child(holder, key)
    if _child(holder, path[-1]) != _PLACEHOLDER:
        return None
    holder[path[-1]] = x
    return doc


def _child(holder: Any, key: str | int) -> Any:
    if isinstance(key, str):
        return holder.get(key) if isinstance(holder, dict) else None
    return holder[key] if isinstance(holder, list) and 0 <= key < len(holder) else None


def _array_span(body: bytes | bytearray, end: int) -> tuple[int, int] | None:
    """Where the longest run of array bytes (digits, signs, '.eE', brackets, commas, whitespace) opens with '['
    and closes with ']', if it is at least TENSOR_MIN_BYTES long."""
    if end < TENSOR_MIN_BYTES:
        return None
    text = body if end == len(body) else bytes(memoryview(body)[:end])
    others = np.flatnonzero(np.frombuffer(text.translate(_OUTSIDE), np.bool_))
    bounds = np.concatenate(([-1], others, [end]))
    i = int(np.diff(bounds).argmax())
    lo, hi = int(bounds[i]) + 1, int(bounds[i + 1])
    if hi - lo < TENSOR_MIN_BYTES:
        return None
    start = body.find(b"[", lo, hi)
    if start < 0 or bytes(body[lo:start]).translate(None, _WHITESPACE):
        return None
    return start, body.rfind(b"]", lo, hi) + 1


def number_array(body: bytes | bytearray, dtype: np.dtype, start: int = 0,
                 stop: int | None = None) -> np.ndarray | None:
    """The JSON array ``body[start:stop]`` as ``np.asarray(json.loads(..), dtype)`` (bit for bit) when it is a
    regular array of numbers, at most TENSOR_MAX_DEPTH deep, with no empty dimension and whitespace only after
    '[' or ',' (json.dumps' ", " included); None otherwise (unusual, or not JSON: json.loads then decides). Read
    in slices of about CHUNK_BYTES: what it holds beside the body stays under what json.loads would (json_cost)."""
    stop = len(body) if stop is None else stop
    if stop - start > 19 * (body.count(b",", start, stop) + 1):
        return None  # mostly numbers of 16 digits or more, past the exact fast path: json.loads reads them
    text = bytes(memoryview(body)[start:stop])
    if len(text) < 2 or text[0] != ord("[") or text[-1] != ord("]") or not _pairs_valid(text):
        return None
    shape = _regular_shape(text.translate(None, _NUMBER_BYTES + _WHITESPACE))
    if shape is None:
        return None
    flat = text.translate(None, b"[]" + _WHITESPACE)
    del text
    out, at, start = np.empty(math.prod(shape), dtype), 0, 0
    while start < len(flat):
        stop = flat.find(b",", start + CHUNK_BYTES) if start + CHUNK_BYTES < len(flat) else -1
        stop = len(flat) if stop < 0 else stop
        chunk = flat[start:stop]
        values = _decimal_values(chunk, chunk.count(b",") + 1)
        if values is None or at + len(values) > out.size:
            return None
        with np.errstate(over="ignore"):  # 1e300 as float32 is inf, as np.asarray makes it
            out[at:at + len(values)] = values
        at, start = at + len(values), stop + 1
    return out.reshape(shape) if at == out.size else None


def _pairs_valid(text: bytes) -> bool:
    """Every pair of adjacent bytes may follow each other in a JSON array of numbers: each byte's kind (white
    space is a '[' here, so it may follow only '[' or ',' and never splits a number), the pairs' codes, and no
    code left once the valid ones are deleted; in slices that overlap by a byte."""
    step = 4 * CHUNK_BYTES
    for at in range(0, max(1, len(text) - 1), step):
        kind = np.frombuffer(text[at:at + step + 1].translate(_KIND), np.uint8)
        codes = np.multiply(kind[:-1], 16, dtype=np.uint8)
        codes += kind[1:]
        if codes.tobytes().translate(None, _VALID_PAIRS):
            return False
    return True


def _regular_shape(brackets: bytes) -> tuple[int, ...] | None:
    """The shape of a regular nested array from its brackets and commas alone ('[[,],[,]]' is (2, 2)), or None
    when they are not exactly those of a regular array."""
    depth = len(brackets) - len(brackets.lstrip(b"["))
    if not 1 <= depth <= TENSOR_MAX_DEPTH:
        return None
    sizes, inner = [], 1  # innermost first; inner: the numbers in one array of the level below
    for level in range(depth, 1, -1):
        close = brackets.find(b"]" * (depth - level + 1))
        numbers = brackets.count(b",", 0, close) + 1  # in the first array of this level
        if close < 0 or numbers % inner:
            return None
        sizes.append(numbers // inner)
        inner = numbers
    total = brackets.count(b",") + 1
    if total % inner:
        return None
    sizes.append(total // inner)
    shape = tuple(reversed(sizes))
    expected = b""
    for size in sizes:
        expected = b"[" + b",".join([expected] * size) + b"]"
    return shape if expected == brackets else None


def _decimal_values(flat: bytes, n: int) -> np.ndarray | None:
    """The ``n`` comma-separated JSON numbers of ``flat`` (checked pair by pair already) as float64, each as
    json.loads reads it; None for a form the pairs allow but JSON does not (01, 1.2.3, 1e2.3, 1e2e3) or an
    integer beyond 2**53 (np.asarray reads it as a Python int)."""
    text = flat + b","
    raw = np.frombuffer(text, np.uint8)
    marks = np.flatnonzero(np.frombuffer(text.translate(_MARKS), np.bool_))  # ',' '.' 'e' 'E' in order
    kinds = raw[marks] | 0x20  # ',' '.' 'e'
    is_comma = kinds == ord(",")
    # within a number, a '.' may be followed by an 'e'; every other pair of marks is not JSON
    inner = ~is_comma[:-1] & ~is_comma[1:]
    if (inner & ~((kinds[:-1] == ord(".")) & (kinds[1:] == ord("e")))).any():
        return None
    commas = marks[is_comma]  # number i ends at commas[i]
    if len(commas) != n:
        return None
    starts = np.concatenate(([0], commas[:-1] + 1))
    neg = raw[starts] == ord("-")
    first = starts + neg
    if ((raw[first] == ord("0")) & (raw[first + 1] - ord("0") < 10)).any():
        return None  # a leading zero
    number = np.cumsum(is_comma) - is_comma  # whose each mark is
    dots, exps = np.flatnonzero(kinds == ord(".")), np.flatnonzero(kinds == ord("e"))
    q, has_exp, decimal = np.zeros(n, np.int64), np.zeros(n, bool), np.zeros(n, bool)
    q[number[dots]] = marks[dots] + 1 - marks[dots + 1]  # minus the digits after the '.'
    has_exp[number[exps]] = decimal[number[dots]] = decimal[number[exps]] = True
    # the digits without the '.', as integers (strtoll, no Python object), and each exponent after its mantissa
    try:
        ints = np.fromstring(flat.translate(_E_TO_COMMA, b"."), np.int64, sep=",")
    except ValueError:  # not read to its end (numpy 2.4; a warning before): never, once the pairs are valid
        return None
    if len(ints) != n + len(exps):
        return None
    where = np.arange(n) + np.cumsum(has_exp) - has_exp
    mantissa = ints[where]
    q[has_exp] += np.clip(ints[where[has_exp] + 1], -(1 << 20), 1 << 20)
    fast = ((np.abs(q) <= 22) & (mantissa >= -(1 << 53)) & (mantissa <= 1 << 53)) | (mantissa == 0)
    values = mantissa * _POW10[np.clip(q, 0, 22)] / _POW10[np.clip(-q, 0, 22)]
    values[neg & (mantissa == 0) & decimal] = -0.0  # "-0.0" is -0.0; "-0" is the int 0
    slow = np.flatnonzero(~fast)
    if len(slow) > SLOW_NUMBERS or not decimal[slow].all():
        return None
    for i in slow:  # float() is what json.loads uses for a number with a fraction or an exponent
        values[i] = float(flat[starts[i]:commas[i]])
    return values


def multipart_file(body: bytes, content_type: str) -> bytes:
    """The 'file' field of a multipart/form-data body (in a worker thread: parsing is CPU work)."""
    try:
        from python_multipart.multipart import MultipartParser, parse_options_header
    except ImportError:  # python-multipart before 0.0.13 installs the module as `multipart`
        from multipart.multipart import MultipartParser, parse_options_header  # type: ignore[no-redef]

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    parts: list[tuple[dict[bytes, bytes], bytearray]] = []
    field, value = bytearray(), bytearray()

    def header_end() -> None:
        parts[-1][0][bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    def part_begin() -> None:
        if len(parts) >= 16:
            raise bad_input("a multipart request holds at most 16 fields")
        parts.append(({}, bytearray()))

    callbacks = {"on_part_begin": part_begin, "on_header_field": lambda b, s, e: field.extend(b[s:e]),
                 "on_header_value": lambda b, s, e: value.extend(b[s:e]), "on_header_end": header_end,
                 "on_part_data": lambda b, s, e: parts[-1][1].extend(b[s:e])}
    try:
        if not boundary:
            raise ValueError("no boundary")
        parser = MultipartParser(boundary, callbacks)
        parser.write(bytes(body))
        parser.finalize()
    except HTTPFailure:
        raise
    except Exception as e:
        log.info("unreadable multipart body: %s", e)
        raise bad_input("unreadable multipart body: send multipart/form-data with the image in a 'file' "
                        "field") from None
    for headers, data in parts:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        if disposition.get(b"name") == b"file" and b"filename" in disposition:
            return bytes(data)
    raise bad_input("a multipart request needs a 'file' field holding the image")


class V2Request:
    def __init__(self, x: np.ndarray | Pieces, binary_output: bool, request_id: str | None) -> None:
        self.x, self.binary_output, self.request_id = x, binary_output, request_id


def _v2_input(req: Any, model: ModelIO) -> tuple[dict[str, Any], list[int]]:
    """The one input tensor of a v2 request and its shape, checked against the model before any data is read."""
    name, datatype = model.input_name, model.datatype
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or len(req["inputs"]) != 1:
        raise bad_input(f'an inference request holds "inputs": [one tensor named {name!r}]')
    inp = req["inputs"][0]
    if not isinstance(inp, dict) or inp.get("name") != name:
        got = inp.get("name") if isinstance(inp, dict) else inp
        raise bad_input(f"unknown input {str(got)[:64]!r}: this model's input is {name!r}")
    if inp.get("datatype") != datatype:
        raise bad_input(f"input {name!r} has datatype {str(inp.get('datatype'))[:16]!r}; this model takes {datatype}")
    shape = inp.get("shape")
    if (not isinstance(shape, list) or len(shape) != len(model.shape) + 1
            or not all(type(d) is int and d >= 0 for d in shape) or tuple(shape[1:]) != model.shape):
        raise bad_input(f"input {name!r} has shape {str(shape)[:80]}; this model takes "
                   f"[n, {', '.join(map(str, model.shape))}]")
    model.check_rows(shape[0])
    return inp, shape


INLINE_BYTES = 1 << 20  # bodies and answers up to this size are parsed and encoded on the event loop


def inline_v2(body: Body, headers: Any) -> bool:
    """True when parsing this request costs less than handing it to a worker thread: a binary tensor (viewed
    in place) under a short JSON header, in a body of at most INLINE_BYTES. JSON tensors go to a thread."""
    raw = headers.get("inference-header-content-length")
    n = None if raw is None else _digits(raw)
    return n is not None and n <= 4096 and len(body) <= INLINE_BYTES


def parse_v2_request(body: Body, headers: Any, model: ModelIO, lease: Lease, intake: Intake) -> V2Request:
    """A KServe v2 inference request (JSON, optionally followed by binary tensor data) -> the input batch: a
    binary tensor stays in the body's chunks (:class:`Pieces`, copied once, into its batch)."""
    raw_len = headers.get("inference-header-content-length")
    n = len(body) if raw_len is None else _digits(raw_len)
    if n is None or n > len(body):
        raise bad_input(f"Inference-Header-Content-Length {raw_len[:20]!r} is not a length within the "
                   f"{len(body)}-byte body")
    head = body.prefix(n)
    dtype = np.dtype(model.spec.dtype).newbyteorder("<")
    req = json_load(head, n, lease, intake, "the inference request header", len(body),
                    (("inputs", 0, "data"), _json_read_type(dtype)))
    inp, shape = _v2_input(req, model)
    count = math.prod(shape)  # Python ints: 2**54 * 3 * 224 * 224 does not wrap to 0 as np.prod does
    params = inp.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad_input(f'the "parameters" of input {model.input_name!r} is an object')
    size, binary = params.get("binary_data_size"), len(body) - n
    x: np.ndarray | Pieces
    if size is not None:
        if type(size) is not int or size != count * dtype.itemsize or binary != size:
            raise bad_input(f"input {model.input_name!r} of shape {shape} {model.datatype} needs "
                       f"{count * dtype.itemsize} bytes of binary data; binary_data_size is {str(size)[:20]} and "
                       f"the body holds {binary}")
        intake.charge(lease, max(lease.held, 2 * len(body)), "this tensor")  # the body, and its copy in a batch
        views = body.views(n)
        x = np.frombuffer(views[0], dtype).reshape(shape) if len(views) == 1 else Pieces(views, dtype, tuple(shape))
    else:
        if binary:
            raise bad_input(f"{binary} bytes of binary data follow the header, but no input has binary_data_size")
        if "data" not in inp:
            raise bad_input(f'input {model.input_name!r} has neither "data" nor a binary_data_size parameter')
        x = _json_array(inp["data"], dtype, shape, model)
    return V2Request(x, *_v2_output_options(req, model))


def _json_read_type(dtype: np.dtype) -> np.dtype:
    # whole-number types are read as float64 (exact for them) and checked, where numpy would truncate 3.7 to 3
    return np.dtype(np.float64) if dtype.kind in "iu" else dtype


def json_numbers(data: Any, dtype: np.dtype) -> np.ndarray:
    """JSON ``data`` as an array of ``dtype`` when it holds numbers only: numpy would read the strings "12" and
    "nan" and the booleans true/false as numbers (a ValueError for anything else, a ragged list included)."""
    x = np.asarray(data)
    if x.dtype.kind not in "iuf":  # str, bool, object (ragged, or an integer beyond int64)
        raise ValueError(f"not numbers ({x.dtype})")
    if not isinstance(data, np.ndarray) and bool in set(map(type, np.asarray(data, dtype=object).ravel())):
        raise ValueError("true/false among the numbers")  # numpy reads them as 1 and 0 beside numbers
    return x.astype(dtype, copy=False)


def _json_array(data: Any, dtype: np.dtype, shape: list[int], model: ModelIO) -> np.ndarray:
    try:
        x = json_numbers(data, _json_read_type(dtype))
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise bad_input(f"input {model.input_name!r}: data is not a list of {model.datatype} numbers") from None
    if x.size != math.prod(shape):
        raise bad_input(f"input {model.input_name!r}: {x.size} values for shape {shape} ({math.prod(shape)} needed)")
    return in_model_type(x.reshape(shape), model)


def in_model_type(x: np.ndarray, model: ModelIO) -> np.ndarray:
    """``x`` as the model's input type, decided here, for this request alone (a batch then holds one type).
    A float model takes any float, cast here (a finite value beyond a float16 model's range is a 400: cast
    later, alone in its batch, it became infinity and NaN logits, a 500 blaming the artifact); a pixel
    (uint8) model takes numbers that are whole and within 0..255, converted here; anything else is a 400
    that names the fix."""
    want = model.dtype
    if x.dtype == want:
        return x
    if want.kind == "f" and x.dtype.kind == "f":
        with np.errstate(over="ignore"):
            y = x.astype(want)
        if not np.isfinite(y).all() and np.isfinite(x).all():
            raise bad_input(f"input {model.input_name!r} takes {model.datatype}: a value is beyond its range "
                            f"(±{float(np.finfo(want).max):g}); send normalized pixels")
        return y
    if want.kind == "u" and x.dtype.kind in "fiu":
        info = np.iinfo(want)
        with np.errstate(invalid="ignore", over="ignore"):
            y = x.astype(want)
            # one pass: NaN, infinities, fractions and values out of range do not survive the round trip
            if np.array_equal(y, x):
                return y
        raise bad_input(f"input {model.input_name!r} takes {model.datatype} pixels: whole numbers from {info.min} "
                        f"to {info.max} (the resized image, not normalized); send those, or an image to /v1/classify")
    raise bad_input(f"input {model.input_name!r} takes {model.datatype}; this request holds {x.dtype} values")


def _v2_output_options(req: dict[str, Any], model: ModelIO) -> tuple[bool, str | None]:
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad_input('"parameters" is an object')
    binary_output = bool(params.get("binary_data_output", False))
    outputs = req.get("outputs") or []
    if not isinstance(outputs, list):
        raise bad_input('"outputs" is a list of output tensors')
    for out in outputs:
        if not isinstance(out, dict) or out.get("name") != model.output_name:
            got = out.get("name") if isinstance(out, dict) else out
            raise bad_input(f"unknown output {str(got)[:64]!r}: this model's output is {model.output_name!r}")
        oparams = out.get("parameters") or {}
        if not isinstance(oparams, dict):
            raise bad_input('an output\'s "parameters" is an object')
        if "classification" in oparams:
            raise bad_input("the classification extension is not supported: ask for the logits, or use /v1/classify")
        binary_output = bool(oparams.get("binary_data", binary_output))
    rid = req.get("id")
    return binary_output, str(rid)[:256] if rid is not None else None


def v2_response(out: np.ndarray, model_name: str, output_name: str, req: V2Request) -> tuple[bytes, dict[str, str]]:
    out = np.ascontiguousarray(out, "<f4")
    tensor: dict[str, Any] = {"name": output_name, "datatype": "FP32", "shape": list(out.shape)}
    head: dict[str, Any] = {"model_name": model_name, "model_version": "1", "outputs": [tensor]}
    if req.request_id is not None:
        head["id"] = req.request_id
    if not req.binary_output:
        tensor["data"] = out.ravel().tolist()
        return json_bytes(head), {}
    raw = out.tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    header = json_bytes(head)
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def inflate(body: bytes | bytearray, encoding: str, intake: Intake, lease: Lease) -> bytearray:
    """Undo a gzip/deflate Content-Encoding (tritonclient's request compression) in steps of 1 MiB, each
    charged to the memory budget and bounded by the body limit: a bomb stops at the first step over."""
    if encoding not in ("gzip", "deflate"):
        raise HTTPFailure(415, "bad_input", f"Content-Encoding {encoding[:20]!r} is not supported: use gzip or deflate")
    limit = intake.body_limit
    inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)  # gzip or zlib framing, told apart by the header
    out = bytearray()
    data: bytes = bytes(body)
    sent = len(data)
    del body
    try:
        while True:
            # charged before the step: the chunk it makes and the buffer it grows are already covered
            intake.charge(lease, max(lease.held, 2 * sent + len(out) + 2 * INFLATE_STEP), "decompressing this body")
            chunk = inflater.decompress(data, INFLATE_STEP)
            data = inflater.unconsumed_tail
            out += chunk
            if len(out) > limit:
                raise HTTPFailure(413, "too_large", f"request body over {limit} bytes once decompressed")
            if not data and len(chunk) < INFLATE_STEP:
                break
    except zlib.error:
        raise bad_input(f"the body is not valid {encoding} data") from None
    return out


def decode_tensor(chunks: Body, dims: tuple[int, ...] | None, model: ModelIO, lease: Lease,
                   intake: Intake) -> np.ndarray:
    """/v1/logits: float32 bytes shaped by X-Shape (``dims``, checked before the body was read), or JSON; in
    the model's input type (:func:`in_model_type`: a pixel model takes whole numbers 0..255)."""
    shape = model.shape
    body = chunks.joined()  # here, in a worker thread, not on the event loop
    if dims is not None:
        want = math.prod(dims) * 4
        if want != len(body):
            raise bad_input(f"body has {len(body)} bytes; X-Shape {dims} float32 needs {want}")
        intake.settle(lease, 2 * len(body), "this tensor")  # the body, and its copy in a batch
        x = np.frombuffer(body, dtype="<f4").reshape(dims)
    else:
        payload = json_load(body, len(body), lease, intake, "the JSON body", tensor=(("inputs",), np.dtype(np.float32)))
        if not isinstance(payload, dict) or "inputs" not in payload:
            raise bad_input('send JSON {"inputs": [...]} shaped [n, C, H, W], or float32 bytes with X-Shape')
        try:
            x = json_numbers(payload["inputs"], np.dtype(np.float32))
        except (TypeError, ValueError, OverflowError, RecursionError):
            raise bad_input('"inputs" is not a list of numbers shaped [n, C, H, W]') from None
    if x.ndim == len(shape):
        x = x[None]
    if tuple(x.shape[1:]) != tuple(shape):
        raise bad_input(f"tensor shape {tuple(x.shape)} does not match the model's [n, {', '.join(map(str, shape))}]")
    model.check_rows(x.shape[0])
    return in_model_type(x, model)
