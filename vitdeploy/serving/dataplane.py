"""The serving data plane: one runtime, its dynamic batcher, the memory budget and the server's state
(preparing, ready, draining, failed), behind the calls the HTTP endpoints make (KServe's
``DataPlane``): :meth:`DataPlane.infer`, :meth:`DataPlane.live`, :meth:`DataPlane.ready`.

Readiness waits for ``prepare`` (warm-up and the golden check, run in a background thread once the
server starts); a failed ``prepare`` leaves the server up but not ready, its reason in the log and in
the readiness answer, and inference refused.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from vitdeploy.engines.base import Runtime
from vitdeploy.errors import VitDeployError
from vitdeploy.serving.batcher import (
    BatcherClosed,
    DynamicBatcher,
    InputRefused,
    QueueFull,
    RequestTimeout,
    WorkerDied,
)
from vitdeploy.serving.errors import HTTPFailure
from vitdeploy.serving.limits import MemoryBudget

log = logging.getLogger("vitdeploy.serve")


class DataPlane:
    """Runtime + batcher + memory budget + state; the endpoints only parse, call this and encode.
    ``workers``: batches in flight at once (the runtime's ``instances``); ``adaptive_delay``: a batch waits
    (up to ``max_delay_ms``) only while announced requests are on their way (see the batcher); ``screen``:
    a reason to refuse an input (400), or None, checked in the batcher's worker."""

    def __init__(self, runtime: Runtime, budget: MemoryBudget, max_batch: int = 32, max_delay_ms: float = 2.0,
                 max_queue: int = 256, request_timeout: float = 30.0,
                 on_batch: Callable[[int, float], None] | None = None, workers: int = 1,
                 adaptive_delay: bool = True, screen: Callable[[np.ndarray], str | None] | None = None) -> None:
        self.runtime, self.budget, self.request_timeout = runtime, budget, request_timeout
        self.max_batch, self.max_delay_ms = max_batch, max_delay_ms
        self.batcher = DynamicBatcher(runtime, max_batch, max_delay_ms, max_queue, on_batch=on_batch, workers=workers,
                                      adaptive=adaptive_delay, screen=screen)
        self.draining = False
        self.preparing: str | None = None  # what readiness waits for, while prepare runs
        self.unfit: str | None = None  # why prepare failed: the server stays up, never ready
        self.prepare_thread: threading.Thread | None = None
        self.prepared: dict[str, Any] = {}  # what prepare's work reported (verified, and why): in /readyz

    # -- state -----------------------------------------------------------------------------------------
    def live(self) -> bool:
        """The process and its inference worker are up."""
        return self.batcher.failure is None

    def ready(self) -> bool:
        """Prepared, not draining, and the batcher takes requests."""
        return self.preparing is None and self.unfit is None and not self.draining and self.batcher.alive

    def readiness(self) -> tuple[int, dict[str, Any]]:
        """/readyz's status code and body."""
        if self.batcher.failure is not None:
            return 503, {"status": "worker_died"}
        if self.unfit is not None:
            return 503, {"status": "failed", "reason": self.unfit}
        if self.preparing is not None:
            return 503, {"status": "preparing", "reason": self.preparing}
        if self.draining or not self.batcher.alive:
            return 503, {"status": "draining"}
        return 200, {"status": "ready", "model": self.runtime.describe(), "max_batch": self.max_batch,
                     **self.prepared}

    def begin_drain(self) -> None:
        """From now on readiness answers 503; requests are still served."""
        self.draining = True

    def prepare(self, work: Callable[[Runtime], Mapping[str, Any] | None], what: str) -> threading.Thread:
        """Run ``work(runtime)`` (warm-up, the golden check) in a background thread; ready once it returns,
        with what it returns (whether the model is verified, and why) in the readiness body. An exception
        keeps the server not ready: its message is logged and becomes the readiness reason."""
        self.preparing = what

        def run() -> None:
            try:
                t0 = time.perf_counter()
                self.prepared = dict(work(self.runtime) or {})
                log.info("ready: %s took %.1f s", what, time.perf_counter() - t0)
            except BaseException as e:  # whatever it is, it is why this server is not ready
                self.unfit = str(e) if isinstance(e, VitDeployError) else f"{type(e).__name__}: {e}"
                log.error("not ready: %s failed: %s", what, self.unfit,
                          exc_info=None if isinstance(e, VitDeployError) else e)
            finally:
                self.preparing = None

        thread = threading.Thread(target=run, name="vitdeploy-prepare", daemon=True)
        self.prepare_thread = thread
        thread.start()
        return thread

    def finish_preparing(self, timeout: float | None = None) -> bool:
        """Wait for :meth:`prepare`'s thread (work inside a runtime cannot be interrupted): True once it has
        ended. Before the runtime is closed or the process exits: a thread still inside ONNX Runtime when
        the process ends aborts it ("terminate called without an active exception")."""
        thread = self.prepare_thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        if thread.is_alive():
            log.warning("the warm-up and golden check are still running after %s s", timeout)
            return False
        return True

    # -- inference -------------------------------------------------------------------------------------
    def expect(self) -> bool:
        """Announce a request whose input is still being read, so a forming batch may wait for it (the
        batcher's adaptive delay); True when announced: pass it to :meth:`infer`, or call :meth:`arrived`."""
        if not self.batcher.adaptive:
            return False
        self.batcher.expect()
        return True

    def arrived(self) -> None:
        """An announced request failed before :meth:`infer`."""
        self.batcher.arrived()

    async def infer(self, x: np.ndarray, deadline: float, expected: bool = False) -> np.ndarray:
        """Rows for ``x`` through the batcher, by ``deadline`` (a ``time.perf_counter`` time); ``expected``:
        announced with :meth:`expect`."""
        late = f"request not answered within {self.request_timeout:g} s"
        remaining = deadline - time.perf_counter()
        if remaining <= 0 or self.unfit is not None:
            if expected:
                self.arrived()
            if remaining <= 0:
                raise HTTPFailure(504, "timeout", late)
            raise HTTPFailure(503, "unavailable", f"this server is not ready ({self.unfit}): retry on another "
                              "replica")
        future = self._submit(x, remaining, expected)
        try:
            return await _within(future, remaining)
        except (asyncio.TimeoutError, RequestTimeout):
            future.cancel()
            raise HTTPFailure(504, "timeout", late) from None
        except InputRefused as e:
            raise HTTPFailure(400, "bad_input", str(e)) from None
        except WorkerDied:
            raise HTTPFailure(503, "unavailable", "the inference worker stopped: retry on another replica") from None
        except BatcherClosed:
            raise HTTPFailure(503, "unavailable", "the server shut down before this request ran: retry",
                              {"Retry-After": "1"}) from None

    def _submit(self, x: np.ndarray, timeout: float, expected: bool) -> Any:
        try:
            return self.batcher.submit(x, timeout=timeout, expected=expected, loop=asyncio.get_running_loop())
        except QueueFull as e:
            raise HTTPFailure(503, "overload", str(e), {"Retry-After": "1"}) from None
        except WorkerDied:
            raise HTTPFailure(503, "unavailable", "the inference worker stopped: this server is not ready, "
                              "retry on another replica") from None
        except BatcherClosed:
            raise HTTPFailure(503, "unavailable", "the server is shutting down: retry", {"Retry-After": "1"}) from None
        except ValueError as e:  # the batcher's own shape checks
            raise HTTPFailure(400, "bad_input", str(e)) from None

    def shutdown(self, close_runtime: bool) -> None:
        """Run what is queued, then close the runtime when asked (never while an inference still runs on it)."""
        stopped = self.batcher.shutdown(True, self.request_timeout)
        prepared = self.finish_preparing(self.request_timeout)
        if close_runtime and stopped and prepared:
            self.runtime.close()


async def _within(awaitable: Any, seconds: float) -> Any:
    """``await awaitable`` for at most ``seconds`` (asyncio.TimeoutError after): a timer on 3.11+, where
    ``wait_for`` would wrap it in a task of its own."""
    if sys.version_info < (3, 11):
        return await asyncio.wait_for(awaitable, seconds)
    async with asyncio.timeout(seconds):
        return await awaitable
