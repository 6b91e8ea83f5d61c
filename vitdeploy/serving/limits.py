"""What a hostile or unlucky client may cost `vitdeploy serve`: a memory budget for request work, the
cost estimates it is charged with, a header read timeout for uvicorn's HTTP/1.1 protocol, the bearer
key check and the one rule for non-finite input (shared with the Triton Python model).

No fastapi or uvicorn at import time: the Triton model imports :func:`non_finite_reason` from here.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import hmac
import ipaddress
import math
import threading
from typing import Any

import numpy as np

MiB = 1024 * 1024
MIN_MEMORY_BUDGET = 256 * MiB
IMAGE_BYTES_PER_PIXEL = 16  # Pillow holds RGB(A) as 4 bytes a pixel; palette -> RGBA -> composite -> RGB: ~4 copies
RESIZE_BYTES_PER_PIXEL = 8  # the resized image and the resize's intermediate pass, 4 bytes a pixel each
JSON_BYTES_PER_ITEM = 40  # a float object (24) and its list slot (8), or an empty list, plus a float32 (4)
TRIM_AFTER_BYTES = 8 * MiB
COUNT_STEP = MiB


def default_memory_budget(item_bytes: int, max_batch: int) -> int:
    """Room for one full ``max_batch`` JSON request (the costliest legal request: ~21 bytes of work per
    input byte, the text twice and a Python float per value), at least 256 MiB."""
    return max(MIN_MEMORY_BUDGET, 24 * max_batch * item_bytes)


def default_max_image_pixels(shape: tuple[int, ...]) -> int:
    """Images up to 256x the model's input area (12.8 MP at 224x224), within 4 MP and 40 MP."""
    height, width = sorted(int(d) for d in shape)[-2:]
    return min(40_000_000, max(4_000_000, 256 * height * width))


def json_cost(body: bytes | bytearray, end: int | None = None) -> int:
    """Bytes that ``json.loads(body[:end])`` may add to the body it parses: the text decoded to a str and
    one Python object per value, counted from the separators before anything is parsed."""
    end = len(body) if end is None else end
    items = 1
    for at in range(0, end, COUNT_STEP):  # in steps: a count holds the GIL, and the event loop needs it
        stop = min(end, at + COUNT_STEP)
        items += body.count(b",", at, stop) + body.count(b"[", at, stop) + body.count(b"{", at, stop)
    return end + JSON_BYTES_PER_ITEM * items


def upfront_cost(declared: int, content_type: str, encoding: str | None) -> int:
    """What a body of ``declared`` bytes typically costs once parsed, reserved before it is read (the exact
    cost, known once it is, is then charged without waiting): JSON floats take ~5x their text, a binary
    tensor 2x (the body and the batch), images and compressed bodies are sized by their header later."""
    if encoding and encoding != "identity":
        return 4 * declared
    if content_type.startswith(("application/octet-stream", "image/", "multipart/")):
        return 2 * declared
    return 5 * declared


def image_cost(body: bytes, pixels: int, resized: int = 0) -> int:
    """Decoding ``pixels`` and resizing them to ``resized`` pixels (before the centre crop): Pillow holds
    RGB as 4 bytes a pixel, and a resize makes its result and one pass's intermediate (at most as large)."""
    return len(body) + IMAGE_BYTES_PER_PIXEL * pixels + RESIZE_BYTES_PER_PIXEL * resized


class MemoryBudget:
    """Bytes of request work (bodies, inflated bodies, parsed JSON, decoded images) in flight at once.

    Thread-safe; :meth:`take` waits (on an event loop) for room, :meth:`try_take` does not.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("the memory budget must be at least 1 byte")
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    def _take_locked(self, n: int) -> bool:
        if self.used + n > self.capacity:
            return False
        self.used += n
        self.peak = max(self.peak, self.used)
        return True

    def try_take(self, n: int) -> bool:
        with self._lock:
            return self._take_locked(n)

    async def take(self, n: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``n`` bytes; False if they did not come free."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with self._lock:
                if self._take_locked(n):
                    return True
                woken = loop.create_future()
                self._waiters.append((loop, woken))
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(woken, remaining)
            except asyncio.TimeoutError:
                return False

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n
            waiters, self._waiters = self._waiters, []
        for loop, woken in waiters:
            loop.call_soon_threadsafe(_wake, woken)


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class Lease:
    """One request's share of a :class:`MemoryBudget`; only its first reservation may wait (a request that
    holds bytes never waits for more, so two requests cannot each hold half and wait for the other)."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.held = 0
        self._lock = threading.Lock()

    def fits(self, total: int) -> bool:
        """Could a request needing ``total`` bytes ever run under this budget?"""
        return total <= self.budget.capacity

    async def reserve(self, n: int, timeout: float) -> bool:
        if self.held:
            return self.grow(n)
        if await self.budget.take(n, timeout):
            with self._lock:
                self.held += n
            return True
        return False

    def grow(self, n: int) -> bool:
        """``n`` more bytes now, or False (thread-safe)."""
        if n <= 0:
            return True
        if not self.budget.try_take(n):
            return False
        with self._lock:
            self.held += n
        return True

    def grow_to(self, total: int) -> bool:
        return self.grow(total - self.held)

    def shrink_to(self, total: int) -> None:
        """Give back what is held beyond ``total`` (an estimate that was too high)."""
        with self._lock:
            extra = max(0, self.held - total)
            self.held -= extra
        if extra:
            self.budget.give(extra)

    def release(self) -> int:
        with self._lock:
            held, self.held = self.held, 0
        if held:
            self.budget.give(held)
        return held


_trimming = threading.Lock()


def trim_memory() -> None:
    """Give freed heap pages back to the OS (glibc's malloc_trim): after a large request, glibc keeps them
    otherwise (its mmap threshold grows with every large free). A no-op off glibc or while another runs."""
    if not _trimming.acquire(blocking=False):
        return
    try:
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
    finally:
        _trimming.release()


M_MMAP_THRESHOLD = -3


def return_large_frees(threshold: int = MiB) -> None:
    """glibc: allocations of ``threshold`` bytes and more come from mmap, so freeing one (a request body, a
    parsed array) gives its memory back at once. glibc's own threshold grows after every large free (up to
    32 MiB), which keeps request-sized buffers on the heap and RSS high after a burst. Process-wide: for the
    serving process only (`run_server`, the ``--workers`` factory). A no-op off glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, threshold)


def freeze_startup_objects() -> None:
    """Move what the process holds after startup (the model, the app, every imported module) out of the
    garbage collector's sight: a full collection walks them all (~45 ms here, more on a busy machine) on
    the event loop, in the middle of whatever request triggered it. For the serving process only."""
    gc.collect()
    gc.freeze()


_LIBC: list[Any] = []


def _libc() -> Any:
    if not _LIBC:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
            _LIBC.append(lib if lib is not None and hasattr(lib, "malloc_trim") else None)
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


MAX_INPUT_MAGNITUDE = 1e6  # normalized pixels are within about +-10; beyond this the model overflows float32


def non_finite_reason(x: np.ndarray, input_name: str) -> str | None:
    """The one rule on every serving path: float input holding NaN, infinity or values no normalized
    image has (|x| > MAX_INPUT_MAGNITUDE, which overflow the model into NaN scores) is refused (HTTP 400)."""
    if x.dtype.kind != "f" or x.size == 0:
        return None
    low, high = float(x.min()), float(x.max())  # two passes, no copies; NaN propagates into both
    if low >= -MAX_INPUT_MAGNITUDE and high <= MAX_INPUT_MAGNITUDE:
        return None
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"input {input_name!r} holds NaN or infinite values: send finite, normalized pixels"
    if max(-low, high) > MAX_INPUT_MAGNITUDE:
        return (f"input {input_name!r} holds values beyond +-{MAX_INPUT_MAGNITUDE:g}: send normalized pixels "
                "(the artifact's mean and std applied)")
    return None


def key_matches(authorization: str | None, key: str) -> bool:
    """``Authorization: Bearer <key>``, compared in constant time."""
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), key.encode())


def api_key_problem(key: str) -> str | None:
    """Why ``key`` can never be sent as ``Authorization: Bearer <key>``, or None. A header carries visible
    ASCII: a non-ASCII key reaches the server as other bytes (headers are read as latin-1) and never
    matches, and a space or control character does not survive the trip either. The key is not quoted."""
    if not key:
        return "the API key is empty"
    bad = next((i for i, ch in enumerate(key) if not 0x21 <= ord(ch) <= 0x7E), None)
    if bad is None:
        return None
    return (f"the API key's character {bad + 1} of {len(key)} is not visible ASCII, so no client could send it "
            "in an Authorization header: use letters, digits and -._~+/= only (for example `openssl rand -hex 32`)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: bool, tls: bool) -> str | None:
    """A warning for a server reachable from other machines without a key or without TLS, else None."""
    if is_loopback(host) or (api_key and tls):
        return None
    risks = []
    if not api_key:
        risks.append("anyone who can reach this port can use the model (add --api-key-file)")
    if not tls:
        risks.append("requests and answers travel in clear text (add --ssl-certfile and --ssl-keyfile)")
    return f"serving on {host}, reachable from other machines: " + "; ".join(risks)
