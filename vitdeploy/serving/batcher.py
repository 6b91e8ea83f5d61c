"""DynamicBatcher: many callers, one model, batches formed on the fly.

Callers submit single images ([C, H, W]) or small batches ([n, C, H, W]) from any thread (or
``await submit_async`` from asyncio) and get futures. A worker thread forms a batch of up to
``max_batch_size`` rows, or whatever has arrived ``max_delay_ms`` after the batch's first request,
runs one inference, and hands each caller exactly its own rows. With ``workers=N`` (a runtime that runs
N calls at once: ``Runtime.instances``) N worker threads take batches from the one queue, so up to N
batches are in flight and the copies of one overlap the compute of another.

With ``adaptive=True`` a batch waits for more rows only while callers have announced requests on their
way (:meth:`expect`, then ``submit(..., expected=True)`` or :meth:`arrived`), and never past
``max_delay_ms``: a server announces each request once its head is in and its body still being read, so
a lone request runs at once, and one a few microseconds behind another still joins its batch (the
"queue delay that adapts to load" of Triton's batcher ideas). Without it every batch that is not full
waits the whole ``max_delay_ms`` after its first request, as Triton's dynamic batcher does.

Guarantees: a full queue rejects at once (:class:`QueueFull`); a request's timeout covers its
whole life, queue and execution (:meth:`infer` and :meth:`submit_async` stop waiting at the deadline
with :class:`RequestTimeout`; one still queued at its deadline is never run); any failure while a
batch is formed, run or handed out (concatenation, the runtime, a wrong row count, the ``on_batch``
callback) fails only that batch's requests and never the worker; should the worker die anyway,
every pending request fails with :class:`WorkerDied`, :attr:`alive` turns False and new requests are
refused at once; an input ``screen`` refuses fails only its own request (:class:`InputRefused`; a screen is a
rule on each element, so a batch passes it when each of its requests does);
:meth:`shutdown` drains (or fails) what is pending; a batch is assembled in the model's input type, and
a request of a type that cannot be cast to it (float pixels for a uint8 model) is refused at
:meth:`submit`, alone, never inside a batch. Each future is resolved exactly once.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vitdeploy.engines.base import Runtime
from vitdeploy.errors import VitDeployError

log = logging.getLogger(__name__)


class QueueFull(VitDeployError):
    """The batcher's queue is full: back off and retry (HTTP 503)."""


class RequestTimeout(VitDeployError, TimeoutError):
    """The request waited longer than its timeout and was not run."""


class BatcherClosed(VitDeployError):
    """The batcher is shut down (or shutting down) and takes no new requests."""


class InputRefused(VitDeployError, ValueError):
    """The batcher's ``screen`` refused this request's input (HTTP 400); the rest of its batch still runs."""


class WorkerDied(BatcherClosed):
    """The batcher's worker thread stopped on an unexpected error; the batcher takes no new requests."""


class Pieces:
    """An input tensor whose bytes lie in several buffers (a request body's chunks, as read from the socket),
    copied once, into the batch that runs it: joining them first would copy every byte one more time, in the
    caller's thread (a server's event loop). ``pieces`` hold exactly ``prod(shape)`` items of ``dtype``."""

    __slots__ = ("dtype", "ndim", "pieces", "shape")

    def __init__(self, pieces: list[memoryview], dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.pieces, self.dtype, self.shape, self.ndim = pieces, np.dtype(dtype), tuple(shape), len(shape)
        nbytes = math.prod(self.shape) * self.dtype.itemsize
        if sum(p.nbytes for p in pieces) != nbytes:
            raise ValueError(f"{sum(p.nbytes for p in pieces)} bytes in pieces for a {self.dtype} tensor of shape "
                             f"{self.shape} ({nbytes} bytes)")

    def one_row_more(self) -> Pieces:
        """The same bytes as a batch of one: [1, *shape]."""
        return Pieces(self.pieces, self.dtype, (1, *self.shape))

    def copy_into(self, out: np.ndarray) -> None:
        """Write the tensor into ``out`` (C-contiguous, this shape and dtype)."""
        flat = out.reshape(-1).view(np.uint8)
        start = 0
        for piece in self.pieces:
            end = start + piece.nbytes
            flat[start:end] = np.frombuffer(piece, np.uint8)
            start = end

    def array(self) -> np.ndarray:
        """The tensor as one array (a copy)."""
        out = np.empty(self.shape, self.dtype)
        self.copy_into(out)
        return out


class _LoopFuture:
    """The batcher's side of an asyncio future of ``loop`` (``submit(..., loop=...)``): resolved from the worker
    through the loop's ``call_soon_threadsafe``, one call for all of a batch's answers on that loop
    (:func:`_deliver`), where a ``concurrent.futures.Future`` wrapped for asyncio costs a lock, a condition and
    a callback on the loop per request."""

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.future = loop, loop.create_future()

    def set_running_or_notify_cancel(self) -> bool:
        """False once the caller cancelled (a read from the worker: :func:`_resolve` checks again on the loop)."""
        return not self.future.cancelled()

    def set_result(self, value: Any) -> None:
        _post(self.loop, [(self.future, value, None)])

    def set_exception(self, error: BaseException) -> None:
        _post(self.loop, [(self.future, None, error)])


def _post(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for these
        loop.call_soon_threadsafe(_resolve, items)


def _resolve(items: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    """On the loop: each future's result or exception, unless its caller has cancelled it meanwhile."""
    for future, value, error in items:
        if future.done():
            continue
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)


def _deliver(requests: list[_Request], results: list[Any]) -> None:
    """Each request's rows: one call per event loop for the requests submitted from one."""
    posts: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Any, BaseException | None]]] = {}
    for r, rows in zip(requests, results, strict=True):
        if isinstance(r.future, _LoopFuture):
            posts.setdefault(r.future.loop, []).append((r.future.future, rows, None))
        else:
            r.future.set_result(rows)
    for loop, items in posts.items():
        _post(loop, items)


@dataclass
class _Request:
    x: np.ndarray | Pieces
    rows: int
    single: bool
    future: Future | _LoopFuture
    deadline: float | None
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatcherStats:
    requests: int = 0
    batches: int = 0
    rows: int = 0
    rejected: int = 0
    timed_out: int = 0
    failed: int = 0
    callback_errors: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)

    @property
    def mean_batch(self) -> float:
        return self.rows / self.batches if self.batches else 0.0


class DynamicBatcher:
    def __init__(self, runtime: Runtime, max_batch_size: int = 32, max_delay_ms: float = 2.0, max_queue: int = 1024,
                 on_batch: Callable[[int, float], None] | None = None, workers: int = 1,
                 adaptive: bool = False, screen: Callable[[np.ndarray], str | None] | None = None) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_delay_ms < 0 or workers < 1:
            raise ValueError("max_batch_size, max_queue and workers must be >= 1 and max_delay_ms >= 0")
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1e3
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.adaptive = adaptive
        self.screen = screen
        self._arriving = 0  # announced requests not yet submitted (adaptive delay)
        self.stats = BatcherStats()
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._closed = False
        self._drain = True
        self.failure: BaseException | None = None  # why the worker died, if it did
        self._workers = [threading.Thread(target=self._loop, name=f"vitdeploy-batcher-{i}", daemon=True)
                         for i in range(workers)]
        self._worker = self._workers[0]
        for worker in self._workers:
            worker.start()

    # -- submitting ------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def workers(self) -> int:
        """Worker threads: batches that can be in flight at once."""
        return len(self._workers)

    @property
    def alive(self) -> bool:
        """The worker runs and takes requests (False once it died or the batcher shut down)."""
        return self.failure is None and not self._closed and all(w.is_alive() for w in self._workers)

    def expect(self) -> None:
        """A request is on its way (adaptive delay): a forming batch may wait for it. Each call is matched by
        one ``submit(..., expected=True)`` or one :meth:`arrived`."""
        with self._cond:
            self._arriving += 1

    def arrived(self) -> None:
        """An announced request will not be submitted (it failed before): batches stop waiting for it."""
        with self._cond:
            self._arriving -= 1
            if self._arriving <= 0:
                self._cond.notify_all()

    def submit(self, x: Any, timeout: float | None = None, expected: bool = False,
               loop: asyncio.AbstractEventLoop | None = None) -> Any:
        """Queue one image [C, H, W] or a batch [n, C, H, W]; the future gives [num_labels] or [n, num_labels].
        ``expected``: this request was announced with :meth:`expect` (whether it is queued or refused).
        ``loop``: called on that running event loop, for an asyncio future of it (cancel it to give up);
        otherwise a ``concurrent.futures.Future``."""
        try:
            arr, single = self._checked(x)
        except ValueError:
            if expected:
                self.arrived()
            raise
        rows = arr.shape[0]
        future: Future | _LoopFuture = Future() if loop is None else _LoopFuture(loop)
        deadline = time.perf_counter() + timeout if timeout is not None else None
        with self._cond:
            if expected:
                self._arriving -= 1
                if self.adaptive and self._arriving <= 0:  # nothing more on its way, queued or refused below
                    self._cond.notify_all()
            if self.failure is not None:
                raise WorkerDied(f"the batcher's worker died ({type(self.failure).__name__}): restart the server")
            if self._closed:
                raise BatcherClosed("the batcher is shut down")
            if len(self._queue) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"queue full ({self.max_queue} requests waiting): retry later")
            self._queue.append(_Request(arr, rows, single, future, deadline))
            self._queued_rows += rows
            self.stats.requests += 1
            # wake the workers only when it changes what they do: a first request to start a batch on, a full
            # batch, or (adaptive) nothing more on its way; one waiting out a batch's delay wakes at its end anyway.
            # A wake-up per request would hand the GIL to a worker that goes straight back to waiting.
            if len(self._queue) == 1 or self._queued_rows >= self.max_batch_size:
                self._cond.notify_all()
        return future.future if isinstance(future, _LoopFuture) else future

    def _checked(self, x: Any) -> tuple[np.ndarray | Pieces, bool]:
        """``x`` as a batch, and whether it was one image; ValueError for a shape the model cannot take."""
        arr = x if isinstance(x, Pieces) else np.asarray(x)
        shape = tuple(self.runtime.spec.shape)
        single = arr.ndim == len(shape)
        if single:
            arr = arr.one_row_more() if isinstance(arr, Pieces) else arr[None]
        if arr.ndim != len(shape) + 1:
            raise ValueError(f"input of shape {arr.shape}: the model takes [C, H, W] images or [n, C, H, W] batches "
                             f"of {shape}")
        rows = arr.shape[0]
        if rows < 1 or rows > self.max_batch_size:
            raise ValueError(f"a request holds 1..{self.max_batch_size} images, got {rows}")
        if tuple(arr.shape[1:]) != tuple(self.runtime.spec.shape):
            raise ValueError(f"image shape {tuple(arr.shape[1:])} does not match the model's {self.runtime.spec.shape}")
        want = np.dtype(self.runtime.spec.dtype)
        if arr.dtype != want and not (want.kind == "f" and arr.dtype.kind == "f"):
            # refused here, alone: in a batch it could only fail the batch (a batch holds the model's one type)
            raise ValueError(f"input of type {arr.dtype}: the model takes {want}"
                             + (" pixels (whole numbers 0..255)" if want == np.uint8 else ""))
        return arr, single

    async def submit_async(self, x: Any, timeout: float | None = None) -> np.ndarray:
        """Submit and await the rows; ``timeout`` bounds queue and execution together."""
        future = self.submit(x, timeout)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError:
            future.cancel()  # dropped from the queue if not yet running; a running batch just finishes
            raise RequestTimeout(f"request not answered within its timeout ({timeout:g} s)") from None

    def infer(self, x: Any, timeout: float | None = None) -> np.ndarray:
        """Submit and wait (the blocking convenience); ``timeout`` bounds queue and execution together."""
        future = self.submit(x, timeout)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RequestTimeout(f"request not answered within its timeout ({timeout:g} s)") from None

    # -- the worker ------------------------------------------------------------------------
    def _expire(self, now: float) -> None:
        """Fail requests whose deadline passed, wherever they sit in the queue (lock held)."""
        if not any(r.deadline is not None and r.deadline <= now for r in self._queue):
            return
        keep: collections.deque[_Request] = collections.deque()
        for r in self._queue:
            if r.deadline is not None and r.deadline <= now:
                self._queued_rows -= r.rows
                self.stats.timed_out += 1
                if r.future.set_running_or_notify_cancel():
                    r.future.set_exception(RequestTimeout(f"request not served within its timeout "
                                                          f"({(now - r.enqueued) * 1e3:.0f} ms waited)"))
            else:
                keep.append(r)
        self._queue = keep

    def _take(self) -> list[_Request] | None:
        """Wait for a batch: full, or max_delay after its first request, or shutdown."""
        with self._cond:
            while True:
                self._expire(time.perf_counter())
                if self._queue:
                    break
                if self._closed:
                    return None
                nearest = min((r.deadline for r in self._queue if r.deadline), default=None)
                self._cond.wait(timeout=None if nearest is None else max(0.0, nearest - time.perf_counter()))
            first = self._queue[0].enqueued
            while self._queued_rows < self.max_batch_size and not self._closed:
                remaining = first + self.max_delay - time.perf_counter()
                if remaining <= 0 or (self.adaptive and self._arriving <= 0):
                    break
                self._cond.wait(timeout=remaining)
                self._expire(time.perf_counter())
                if not self._queue:
                    return []
            if self._closed and not self._drain:
                return []
            batch: list[_Request] = []
            rows = 0
            while self._queue and rows + self._queue[0].rows <= self.max_batch_size:
                r = self._queue.popleft()
                self._queued_rows -= r.rows
                if r.future.set_running_or_notify_cancel():  # False: the caller cancelled it
                    batch.append(r)
                    rows += r.rows
            return batch

    def _loop(self) -> None:
        # this worker's own (its batch is in flight until it returns), in the model's input type
        buffer = _BatchBuffer(self.max_batch_size, np.dtype(self.runtime.spec.dtype))
        try:
            while True:
                batch = self._take()
                if batch is None:
                    return
                if batch:
                    self._run_batch(batch, buffer)
        except BaseException as e:  # the worker itself broke: fail what waits, refuse what comes
            log.exception("the batcher's worker died")
            with self._cond:
                self.failure = e
                pending = list(self._queue)
                self._queue.clear()
                self._queued_rows = 0
            for r in pending:
                if r.future.set_running_or_notify_cancel():
                    r.future.set_exception(WorkerDied("the batcher's worker died before this request ran"))

    def _screened(self, batch: list[_Request], x: np.ndarray) -> tuple[list[_Request], np.ndarray]:
        """The requests whose rows of ``x`` the ``screen`` passes, and their rows; the others fail with
        :class:`InputRefused` (or with what the screen raised). In the worker, off the callers' threads: a
        server's event loop does not scan inputs. The whole batch is screened first, one call where every
        request passes."""
        try:
            if len(batch) > 1 and self.screen(x) is None:  # type: ignore[misc]
                return batch, x
        except BaseException:  # screened one by one below, which fails only the request it fails on
            pass
        kept, rows, start = [], [], 0
        for r in batch:
            part = x[start:start + r.rows]
            start += r.rows
            try:
                reason = self.screen(part)  # type: ignore[misc]
                error: BaseException | None = None if reason is None else InputRefused(reason)
            except BaseException as e:
                error = e
            if error is None:
                kept.append(r)
                rows.append(part)
            else:
                r.future.set_exception(error)
        if len(kept) < len(batch):
            failed = len(batch) - len(kept)
            try:
                x = np.concatenate(rows) if rows else x[:0]
            except BaseException as e:  # no batch without the refused rows: the others fail, not the worker
                for r in kept:
                    r.future.set_exception(e)
                failed, kept = len(batch), []
            with self._cond:
                self.stats.failed += failed
        return kept, x

    def _run_batch(self, batch: list[_Request], buffer: _BatchBuffer) -> None:
        """Run one batch; whatever fails here fails this batch's requests only."""
        try:
            one = batch[0].x
            x = one if len(batch) == 1 and isinstance(one, np.ndarray) else buffer.assemble([r.x for r in batch])
        except BaseException as e:
            self._fail(batch, e)
            return
        if self.screen is not None:
            batch, x = self._screened(batch, x)
            if not batch:
                return
        try:
            t0 = time.perf_counter()
            out = np.asarray(self.runtime.infer(x))
            seconds = time.perf_counter() - t0
            if out.ndim < 1 or out.shape[0] != x.shape[0]:
                raise RuntimeError(f"runtime returned {out.shape[0] if out.ndim else 'no'} rows "
                                   f"for {x.shape[0]} inputs")
            results, start = [], 0
            for r in batch:
                rows = out[start:start + r.rows]
                start += r.rows
                results.append(rows[0] if r.single else rows)
        except BaseException as e:
            self._fail(batch, e)
            return
        with self._cond:  # several workers count here
            self.stats.batches += 1
            self.stats.rows += x.shape[0]
            self.stats.batch_sizes[x.shape[0]] += 1
        if self.on_batch is not None:  # before the answers, so metrics read after an answer include its batch
            try:  # a broken metrics hook costs a log line, never an answer or the worker
                self.on_batch(x.shape[0], seconds)
            except BaseException:
                with self._cond:
                    self.stats.callback_errors += 1
                log.exception("on_batch callback failed")
        _deliver(batch, results)

    def _fail(self, batch: list[_Request], error: BaseException) -> None:
        with self._cond:
            self.stats.failed += len(batch)
        for r in batch:
            r.future.set_exception(error)

    # -- shutdown --------------------------------------------------------------------------
    def shutdown(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop taking requests; ``drain`` runs what is queued, otherwise it fails with BatcherClosed.

        True once the worker has stopped; False if it is still running after ``timeout`` seconds (stuck in
        an inference that does not return): the caller should not release what that inference uses."""
        with self._cond:
            self._closed = True
            self._drain = drain
            if not drain:
                while self._queue:
                    r = self._queue.popleft()
                    self._queued_rows -= r.rows
                    if r.future.set_running_or_notify_cancel():
                        r.future.set_exception(BatcherClosed("the batcher shut down before this request ran"))
            self._cond.notify_all()
        end = None if timeout is None else time.perf_counter() + timeout
        for worker in self._workers:
            worker.join(None if end is None else max(0.0, end - time.perf_counter()))
        if any(w.is_alive() for w in self._workers):
            log.warning("the batcher's worker is still running %s s after shutdown (an inference has not "
                        "returned)", timeout)
            return False
        return True

    def __enter__(self) -> DynamicBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class _BatchBuffer:
    """Where one worker assembles its batches: ``max_batch`` rows allocated once and reused, so a batch is one
    copy into memory that is already mapped. A fresh array per batch would come from mmap (large buffers do,
    in the serving process: :func:`vitdeploy.serving.limits.return_large_frees`) and fault in every page of
    every batch, with the worker holding the GIL."""

    def __init__(self, max_batch: int, dtype: np.dtype) -> None:
        self.max_batch, self.dtype = max_batch, dtype
        self.rows: np.ndarray | None = None

    def assemble(self, parts: list[np.ndarray | Pieces]) -> np.ndarray:
        """``np.concatenate(parts)`` (each :class:`Pieces` copied in from its buffers), into this buffer: a
        view of it, valid until the next call. The batch has the model's input type, whatever its parts
        hold (never a type taken from the parts: one odd request would change every request's batch)."""
        first = parts[0]
        dtype = self.dtype
        if self.rows is None or self.rows.shape[1:] != first.shape[1:]:
            self.rows = None  # the old one goes before the new one is made
            self.rows = np.empty((self.max_batch, *first.shape[1:]), dtype)
        start = 0
        for part in parts:
            out = self.rows[start:start + part.shape[0]]
            start += part.shape[0]
            if isinstance(part, Pieces) and part.dtype == dtype:
                part.copy_into(out)
            else:
                np.copyto(out, part.array() if isinstance(part, Pieces) else part, casting="same_kind")
        return self.rows[:start]
