"""What wraps every request of `vitdeploy serve`: the bearer key (ASGI middleware, and a check the
inference routes call), and around each inference request one :class:`RequestScope` (request id, start
time, memory lease, its announcement to the batcher, metrics), so no handler times, counts, releases or
catches anything itself (:mod:`vitdeploy.serving.asgi` runs each handler inside one).

Metrics live in :class:`Metrics`, the one place that writes them: answers and failures per endpoint from
the request scope, batch sizes and inference times from the batcher's callback.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from typing import TYPE_CHECKING, Any, NamedTuple

from vitdeploy.serving.errors import HTTPFailure
from vitdeploy.serving.limits import TRIM_AFTER_BYTES, Lease, key_matches, trim_memory

if TYPE_CHECKING:
    from vitdeploy.serving.dataplane import DataPlane

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Answer(NamedTuple):
    """A whole response of an inference route: status, body, media type and extra headers."""

    status: int
    body: bytes
    media_type: str
    headers: dict[str, str]


class Metrics:
    """The server's Prometheus registry and every metric in it."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("vitdeploy_requests", "HTTP requests", ["endpoint", "code"], registry=registry)
        self.errors = Counter("vitdeploy_errors", "Failed requests", ["endpoint", "reason"], registry=registry)
        self.latency = Histogram("vitdeploy_request_latency_seconds", "Request latency", ["endpoint"],
                                 registry=registry, buckets=LATENCY_BUCKETS)
        self.batch = Histogram("vitdeploy_batch_size", "Rows per inference batch", registry=registry,
                               buckets=tuple(float(2**i) for i in range(11)))
        self.inference = Histogram("vitdeploy_inference_seconds", "Time per inference batch", registry=registry)
        self.queue = Gauge("vitdeploy_queue_depth", "Requests waiting for a batch", registry=registry)
        self.memory = Gauge("vitdeploy_request_memory_bytes", "Request work charged to the memory budget",
                            registry=registry)
        self._answered: dict[str, tuple[Any, Any]] = {}

    def watch(self, plane: DataPlane) -> None:
        """The gauges read the data plane's queue and memory budget when scraped."""
        self.queue.set_function(lambda: plane.batcher.queue_depth)
        self.memory.set_function(lambda: plane.budget.used)

    def on_batch(self, rows: int, seconds: float) -> None:
        self.batch.observe(rows)
        self.inference.observe(seconds)

    def answered(self, endpoint: str, seconds: float) -> None:
        children = self._answered.get(endpoint)
        if children is None:  # each endpoint's two series, looked up once (a lookup takes a lock and a tuple)
            children = self._answered[endpoint] = (self.latency.labels(endpoint), self.requests.labels(endpoint, "200"))
        children[0].observe(seconds)
        children[1].inc()

    def failed(self, endpoint: str, e: HTTPFailure) -> None:
        self.errors.labels(endpoint, e.reason).inc()
        self.requests.labels(endpoint, str(e.code)).inc()

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _RequestIds:
    """Request ids unique to a server's lifetime: the process's random prefix and a counter (16 hex digits, as
    a uuid4's first 16 were, without a getrandom call and a UUID object per request). A forked child draws
    a prefix of its own."""

    def __init__(self) -> None:
        self.renew()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self.prefix, self.count = uuid.uuid4().hex[:8], itertools.count(1)

    def next(self) -> str:
        n = next(self.count)
        if n > 0xFFFFFFFF:  # 2**32 requests: a new prefix before a number comes back
            self.renew()
            n = next(self.count)
        return f"{self.prefix}{n:08x}"


next_request_id = _RequestIds().next


class RequestScope:
    """One inference request's id, start, memory lease and endpoint; it answers and counts the outcome."""

    def __init__(self, request: Any, endpoint: str, plane: DataPlane, metrics: Metrics) -> None:
        self.start, self.endpoint, self.plane, self.metrics = time.perf_counter(), endpoint, plane, metrics
        self.v2 = endpoint.startswith("v2")
        rid = request.headers.get("x-request-id", "")
        self.rid = rid if 0 < len(rid) <= 128 and rid.isascii() and rid.isprintable() else next_request_id()
        self.lease = Lease(plane.budget)
        self.expected = plane.expect()  # a forming batch may wait for this request's input

    async def infer(self, x: Any) -> Any:
        """The request's rows through the data plane, by its deadline."""
        expected, self.expected = self.expected, False
        return await self.plane.infer(x, self.deadline, expected)

    @property
    def deadline(self) -> float:
        return self.start + self.plane.request_timeout

    def headers(self) -> dict[str, str]:
        # while draining, no connection stays open for reuse: when the server stops, no client is caught
        # sending its next request on a kept-alive connection that is being closed
        closing = {"Connection": "close"} if self.plane.draining else {}
        return {**closing, "X-Request-ID": self.rid}

    def answer(self, content: bytes, media_type: str, headers: dict[str, str] | None = None) -> Answer:
        """The 200 response, counted."""
        self.metrics.answered(self.endpoint, time.perf_counter() - self.start)
        return Answer(200, content, media_type, {**(headers or {}), **self.headers()})

    def failed(self, e: HTTPFailure) -> None:
        self.metrics.failed(self.endpoint, e)

    def release(self) -> None:
        """Give the memory lease back (and the announcement of a request that failed before its inference);
        trim the heap once a large burst is over (malloc_trim holds the allocator's locks while it walks the
        heap, and every thread that allocates meanwhile waits)."""
        if self.expected:
            self.expected = False
            self.plane.arrived()
        if self.lease.release() >= TRIM_AFTER_BYTES and self.plane.budget.used == 0:
            asyncio.get_running_loop().run_in_executor(None, trim_memory)


class BearerKey:
    """ASGI middleware: every HTTP request but the ``public`` paths needs ``Authorization: Bearer <key>``."""

    def __init__(self, app: Any, key: str, public: tuple[str, ...] = ()) -> None:
        self.app, self.key, self.public = app, key, frozenset(public)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and await self.refuse(scope, send):
            return
        await self.app(scope, receive, send)

    async def refuse(self, scope: dict[str, Any], send: Any) -> bool:
        """Answer 401 and return True when this HTTP request needs the key and lacks it."""
        if scope["path"] in self.public:
            return False
        auth = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        if key_matches(auth, self.key):
            return False
        body = b'{"error": "this server needs an API key: send Authorization: Bearer <key>"}'
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
        return True
