"""`vitdeploy serve`: an HTTP server (FastAPI + uvicorn) over a DynamicBatcher.

Imports no torch: a serving install (``vitdeploy[serve]`` with ONNX Runtime or TensorRT) serves an
ONNX file or an engine, with preprocessing and labels from the artifact's metadata.

    POST /v1/classify   image bytes (or multipart field "file"); ?top_k=5
    POST /v1/logits     JSON {"inputs": [[C][H][W]...]} or application/octet-stream float32 with X-Shape: n,C,H,W
    GET  /healthz       the process and its inference worker are up
    GET  /readyz        the model is loaded and the server is not draining
    GET  /metrics       Prometheus text format

and the KServe v2 / Triton HTTP inference protocol, so ``tritonclient.http`` works unchanged:

    GET  /v2, /v2/health/live, /v2/health/ready
    GET  /v2/models/{name}[/versions/1], .../ready, .../config
    POST /v2/models/{name}[/versions/1]/infer   JSON tensors or the binary tensor data extension

Every request's CPU work (decoding, JSON, serialisation) runs in a worker thread, never on the event
loop. A request's timeout covers its whole life. Errors the server did not foresee are logged with a
request id; the client gets a generic message and that id, never the exception's text.

Hostile clients (issue 18): each request's decode and parse work is charged to a memory budget before
it runs (a request that cannot fit gets 413 before it is parsed; one that must wait too long, 503); the
body has an idle read timeout and the whole request the request timeout; uvicorn adds a head timeout
(:mod:`vitdeploy.serving.http11`), a keep-alive timeout and a connection limit. Non-finite input is
refused; an optional bearer key guards every route (probes too, unless made public).
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint annotations at run time
import asyncio
import io
import json
import logging
import math
import os
import sys
import threading
import time
import traceback
import uuid
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from vitdeploy.engines.base import softmax
from vitdeploy.errors import VitDeployError
from vitdeploy.serving.batcher import BatcherClosed, DynamicBatcher, QueueFull, RequestTimeout, WorkerDied
from vitdeploy.serving.limits import (
    TRIM_AFTER_BYTES,
    Lease,
    MemoryBudget,
    MiB,
    default_max_image_pixels,
    default_memory_budget,
    freeze_startup_objects,
    image_cost,
    json_cost,
    key_matches,
    non_finite_reason,
    return_large_frees,
    trim_memory,
    upfront_cost,
)
from vitdeploy.sysinfo import usable_cpus

log = logging.getLogger("vitdeploy.serve")

DEFAULT_MAX_BODY = 20 * 1024 * 1024
DEFAULT_DRAIN_GRACE = 5.0
DEFAULT_BODY_TIMEOUT = 10.0  # seconds without a byte of the body before the request is dropped (408)
DEFAULT_LIMIT_CONCURRENCY = 512  # connections and requests at once; uvicorn answers 503 beyond
DEFAULT_KEEP_ALIVE = 5
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds to send a whole request head (vitdeploy.serving.http11)
INFLATE_STEP = 1 << 20
PROBES = ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready")
# numpy dtype name -> KServe v2 datatype
V2_DATATYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "uint8": "UINT8", "int8": "INT8",
                "int32": "INT32", "int64": "INT64"}


class HTTPFailure(Exception):
    """A request that cannot be answered: status code, a metrics reason and the message the client sees."""

    def __init__(self, code: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.headers = code, reason, message, headers or {}


def create_app(runtime: Any, max_batch: int = 32, max_delay_ms: float = 2.0, max_queue: int = 256,
               request_timeout: float = 30.0, max_body_bytes: int | None = None,
               max_image_pixels: int | None = None, model_name: str = "model", owns_runtime: bool = False,
               memory_budget: int | None = None, body_timeout: float = DEFAULT_BODY_TIMEOUT,
               api_key: str | None = None, public_probes: bool = False) -> Any:
    """The FastAPI app. The runtime stays the caller's (closed at shutdown only with ``owns_runtime``).

    ``max_body_bytes`` defaults to 20 MiB or room for a full ``max_batch`` as JSON, whichever is larger;
    ``memory_budget`` (bytes of decode and parse work at once) to room for one such JSON request, at
    least 256 MiB; ``max_image_pixels`` to 256x the model's input area. With ``api_key`` every route
    wants ``Authorization: Bearer <key>``; ``public_probes`` exempts the health, readiness and metrics probes.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from starlette.concurrency import run_in_threadpool

    from vitdeploy.preprocess import ImageError, Preprocessing, open_image

    spec = runtime.spec
    item_bytes = math.prod(spec.shape) * np.dtype(spec.dtype).itemsize
    if max_body_bytes is None:
        max_body_bytes = max(DEFAULT_MAX_BODY, 6 * max_batch * item_bytes)
    pixel_limit = max_image_pixels or default_max_image_pixels(spec.shape)
    budget = MemoryBudget(memory_budget or default_memory_budget(item_bytes, max_batch))
    intake = _Intake(budget, max_body_bytes, body_timeout, request_timeout)

    registry = CollectorRegistry()
    m_requests = Counter("vitdeploy_requests", "HTTP requests", ["endpoint", "code"], registry=registry)
    m_errors = Counter("vitdeploy_errors", "Failed requests", ["endpoint", "reason"], registry=registry)
    m_latency = Histogram("vitdeploy_request_latency_seconds", "Request latency", ["endpoint"], registry=registry,
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
    m_batch = Histogram("vitdeploy_batch_size", "Rows per inference batch", registry=registry,
                        buckets=tuple(float(2**i) for i in range(11)))
    m_infer = Histogram("vitdeploy_inference_seconds", "Time per inference batch", registry=registry)
    m_queue = Gauge("vitdeploy_queue_depth", "Requests waiting for a batch", registry=registry)
    m_memory = Gauge("vitdeploy_request_memory_bytes", "Request work charged to the memory budget", registry=registry)
    m_memory.set_function(lambda: budget.used)

    def on_batch(rows: int, seconds: float) -> None:
        m_batch.observe(rows)
        m_infer.observe(seconds)

    batcher = DynamicBatcher(runtime, max_batch, max_delay_ms, max_queue, on_batch=on_batch)
    m_queue.set_function(lambda: batcher.queue_depth)
    own_preprocess = getattr(runtime, "preprocess", None)
    labels = runtime.labels
    num_labels = len(labels) or int((runtime.metadata.config if runtime.metadata else {}).get("num_labels", -1))
    model = _ModelIO(spec, spec.name, getattr(runtime, "output_name", None) or "logits",
                     V2_DATATYPES.get(spec.dtype, spec.dtype.upper()), max_batch)
    state = {"draining": False}

    def begin_drain() -> None:
        """From now on /readyz and /v2/health/ready answer 503; requests are still served."""
        state["draining"] = True

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        begin_drain()
        # uvicorn has finished in-flight requests; run what is queued, then release what we own
        stopped = await run_in_threadpool(batcher.shutdown, True, request_timeout)
        if owns_runtime and stopped:  # never close a runtime an inference still runs on
            runtime.close()

    app = FastAPI(title="vitdeploy", version=_version(), lifespan=lifespan)
    if api_key:
        app.add_middleware(BearerKey, key=api_key, public=PROBES if public_probes else ())
    app.state.batcher = batcher
    app.state.registry = registry
    app.state.begin_drain = begin_drain
    app.state.model_name = model_name
    app.state.memory_budget = budget
    app.state.max_image_pixels = pixel_limit

    def ready() -> bool:
        return not state["draining"] and batcher.alive

    def request_id(request: Request) -> str:
        rid = request.headers.get("x-request-id", "")
        return rid if 0 < len(rid) <= 128 and rid.isascii() and rid.isprintable() else uuid.uuid4().hex[:16]

    def failure(endpoint: str, rid: str, e: HTTPFailure, v2: bool = False) -> Any:
        m_errors.labels(endpoint, e.reason).inc()
        m_requests.labels(endpoint, str(e.code)).inc()
        body = {"error": e.message} if v2 else {"error": e.message, "request_id": rid}
        return JSONResponse(body, status_code=e.code, headers={**e.headers, **closing(), "X-Request-ID": rid})

    def closing() -> dict[str, str]:
        # while draining, no connection stays open for reuse: when the server stops, no client is caught
        # sending its next request on a kept-alive connection that is being closed
        return {"Connection": "close"} if state["draining"] else {}

    def unexpected(endpoint: str, rid: str, e: BaseException, v2: bool = False) -> Any:
        log.error("request %s on %s failed", rid, endpoint, exc_info=e)
        return failure(endpoint, rid, HTTPFailure(500, "internal", f"internal error (request id {rid}); "
                                                  f"the server log has the details"), v2)

    async def answer(endpoint: str, request: Request, work: Callable[..., Any], v2: bool = False) -> Any:
        """Run ``work(request, lease, start, rid) -> (content, media type, headers)`` and answer; the
        request's memory lease is given back whatever happens (and the heap trimmed after a large one)."""
        start, rid = time.perf_counter(), request_id(request)
        lease = Lease(budget)
        try:
            content, media_type, headers = await work(request, lease, start, rid)
        except HTTPFailure as e:
            _forget_frames(e)
            return failure(endpoint, rid, e, v2)
        except Exception as e:
            response = unexpected(endpoint, rid, e, v2)
            _forget_frames(e)
            return response
        finally:
            # trim once the burst is over: malloc_trim holds the allocator's locks while it walks the heap,
            # and every thread that allocates meanwhile (the event loop too) waits
            if lease.release() >= TRIM_AFTER_BYTES and budget.used == 0:
                asyncio.get_running_loop().run_in_executor(None, trim_memory)
        m_latency.labels(endpoint).observe(time.perf_counter() - start)
        m_requests.labels(endpoint, "200").inc()
        return Response(content, media_type=media_type, headers={**headers, **closing(), "X-Request-ID": rid})

    async def infer(x: np.ndarray, start: float) -> np.ndarray:
        """Rows for ``x`` through the batcher, within what is left of the request's timeout."""
        remaining = request_timeout - (time.perf_counter() - start)
        if remaining <= 0:
            raise HTTPFailure(504, "timeout", f"request not answered within {request_timeout:g} s")
        try:
            future = batcher.submit(x, timeout=remaining)
        except QueueFull as e:
            raise HTTPFailure(503, "overload", str(e), {"Retry-After": "1"}) from None
        except WorkerDied:
            raise HTTPFailure(503, "unavailable", "the inference worker stopped: this server is not ready, "
                              "retry on another replica") from None
        except BatcherClosed:
            raise HTTPFailure(503, "unavailable", "the server is shutting down: retry", {"Retry-After": "1"}) from None
        except ValueError as e:  # the batcher's own shape checks
            raise HTTPFailure(400, "bad_input", str(e)) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), remaining)
        except (asyncio.TimeoutError, RequestTimeout):
            future.cancel()
            raise HTTPFailure(504, "timeout", f"request not answered within {request_timeout:g} s") from None
        except WorkerDied:
            raise HTTPFailure(503, "unavailable", "the inference worker stopped: retry on another replica") from None
        except BatcherClosed:
            raise HTTPFailure(503, "unavailable", "the server shut down before this request ran: retry",
                              {"Retry-After": "1"}) from None

    # -- v1 ----------------------------------------------------------------------------------------------
    def decode_image(body: bytes | bytearray, lease: Lease, rid: str) -> np.ndarray:
        """Image bytes -> the model's input for one image; the header's size is checked (and its decoding
        charged to the memory budget) before anything is decoded."""
        from PIL import Image

        body = bytes(body)
        try:
            with Image.open(io.BytesIO(body)) as probe:  # reads the header only
                width, height = probe.size
        except Image.DecompressionBombError:
            width, height = 1 << 31, 1
        except Exception:  # unreadable: open_image says so below
            width, height = 0, 0
        if width * height > pixel_limit:
            raise HTTPFailure(413, "too_large", f"image of {width * height} pixels is over this server's limit of "
                              f"{pixel_limit} (--max-image-pixels): send a smaller image")
        intake.settle(lease, len(body) + image_cost(body, width * height), "decoding this image")
        try:
            image = open_image(body)
        except ImageError as e:
            log.info("request %s: unreadable image: %s", rid, e)
            raise HTTPFailure(400, "bad_image", "the body is not a readable image: send JPEG, PNG, WebP, BMP, "
                              "GIF or TIFF bytes, or a multipart 'file' field holding one") from None
        if own_preprocess is not None:  # the batch form this artifact takes (float32 NCHW, or uint8 NHWC)
            return np.asarray(own_preprocess([image]))[0]
        return Preprocessing.from_dict(runtime.metadata.preprocessing)(image)

    def top_k_json(logits: np.ndarray, k: int) -> bytes:
        probs = softmax(logits[None])[0]
        idx = np.argsort(-probs)[:k]
        return _json_bytes({"top_k": [{"label": labels[i] if i < len(labels) else str(i), "index": int(i),
                                       "score": float(probs[i])} for i in idx]})

    async def classify_work(request: Request, lease: Lease, start: float, rid: str) -> tuple[bytes, str, dict]:
        if runtime.metadata is None:
            raise HTTPFailure(400, "no_metadata", "this artifact has no preprocessing metadata: "
                              "use /v1/logits or re-export it with vitdeploy")
        k = _top_k(request.query_params.get("top_k"), num_labels if num_labels > 0 else 1000)
        body = await intake.read_body(request, lease, start)
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            intake.settle(lease, 2 * len(body), "reading this form")
            body = await intake.cpu(_multipart_file, body, ctype)
        if not body:
            raise HTTPFailure(400, "bad_input", "empty body: send image bytes")
        x = await intake.cpu(decode_image, body, lease, rid)
        del body
        logits = await infer(x, start)
        return await intake.cpu(top_k_json, logits, k), "application/json", {}

    async def logits_work(request: Request, lease: Lease, start: float, rid: str) -> tuple[bytes, str, dict]:
        binary = request.headers.get("content-type", "").startswith("application/octet-stream")
        dims = _binary_dims(request.headers.get("x-shape"), spec.shape, max_batch) if binary else None
        if dims is not None:
            want = math.prod(dims) * 4
            declared = _content_length(request.headers)
            if declared is not None and declared != want and not request.headers.get("content-encoding"):
                raise _bad(f"body has {declared} bytes; X-Shape {dims} float32 needs {want}")
        body = await intake.read_body(request, lease, start)
        x = await intake.cpu(_decode_tensor, body, dims, model, lease, intake)
        del body
        out = await infer(x, start)
        if request.headers.get("accept") == "application/octet-stream":
            raw = await intake.cpu(lambda: np.ascontiguousarray(out, "<f4").tobytes())
            return raw, "application/octet-stream", {"X-Shape": ",".join(map(str, out.shape))}
        return await intake.cpu(_json_bytes, {"logits": out.tolist()}), "application/json", {}

    @app.post("/v1/classify")
    async def classify(request: Request) -> Any:
        return await answer("classify", request, classify_work)

    @app.post("/v1/logits")
    async def logits(request: Request) -> Any:
        return await answer("logits", request, logits_work)

    @app.get("/healthz")
    async def healthz() -> Any:
        if batcher.failure is not None:
            return JSONResponse({"status": "worker_died"}, status_code=503)
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Any:
        if batcher.failure is not None:
            return JSONResponse({"status": "worker_died"}, status_code=503)
        if state["draining"] or not batcher.alive:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ready", "model": runtime.describe(), "max_batch": max_batch}

    @app.get("/metrics")
    async def metrics() -> Any:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # -- KServe v2 / Triton --------------------------------------------------------------------------------
    def v2_error(code: int, message: str) -> Any:
        return JSONResponse({"error": message}, status_code=code)

    def known(name: str, version: str | None) -> Any:
        if name != model_name:
            return v2_error(404, f"unknown model {name!r}: this server serves {model_name!r}")
        if version not in (None, "", "1"):
            return v2_error(404, f"unknown version {version!r} of model {name!r}: the only version is '1'")
        return None

    @app.get("/v2")
    async def v2_server() -> Any:
        return {"name": "vitdeploy", "version": _version(), "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def v2_live() -> Any:
        return Response(status_code=200 if batcher.failure is None else 503)

    @app.get("/v2/health/ready")
    async def v2_ready() -> Any:
        return Response(status_code=200 if ready() else 503)

    def model_route(suffix: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
        """GET /v2/models/{name}[/versions/{version}]<suffix>: 404 for another model, else the handler."""
        def register(handler: Callable[[], Any]) -> Callable[[], Any]:
            async def route(name: str, version: str | None = None) -> Any:
                if (bad := known(name, version)) is not None:
                    return bad
                return handler()

            route.__name__ = handler.__name__
            app.get("/v2/models/{name}" + suffix)(route)
            app.get("/v2/models/{name}/versions/{version}" + suffix)(route)
            return handler
        return register

    @model_route("")
    def v2_model() -> Any:
        return {"name": model_name, "versions": ["1"], "platform": f"vitdeploy_{runtime.backend}",
                "inputs": [{"name": model.input_name, "datatype": model.datatype, "shape": [-1, *spec.shape]}],
                "outputs": [{"name": model.output_name, "datatype": "FP32", "shape": [-1, num_labels]}]}

    @model_route("/ready")
    def v2_model_ready() -> Any:
        return Response(status_code=200 if ready() else 503)

    @model_route("/config")
    def v2_config() -> Any:
        return {"name": model_name, "platform": f"vitdeploy_{runtime.backend}", "max_batch_size": max_batch,
                "input": [{"name": model.input_name, "data_type": f"TYPE_{model.datatype}", "dims": list(spec.shape)}],
                "output": [{"name": model.output_name, "data_type": "TYPE_FP32", "dims": [num_labels]}],
                "dynamic_batching": {"max_queue_delay_microseconds": int(max_delay_ms * 1000)}}

    async def v2_work(request: Request, lease: Lease, start: float, rid: str) -> tuple[bytes, str, dict]:
        body = await intake.read_body(request, lease, start)
        req = await intake.cpu(_parse_v2_request, body, request.headers, model, lease, intake)
        del body
        out = await infer(req.x, start)
        content, headers = await intake.cpu(_v2_response, out, model_name, model.output_name, req)
        return content, "application/octet-stream" if req.binary_output else "application/json", headers

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_infer(request: Request, name: str, version: str | None = None) -> Any:
        if (bad := known(name, version)) is not None:
            return bad
        return await answer("v2_infer", request, v2_work, v2=True)

    return app


class _ModelIO:
    """What a request is checked against: the input spec, tensor names, v2 datatype and batch limit."""

    def __init__(self, spec: Any, input_name: str, output_name: str, datatype: str, max_batch: int) -> None:
        self.spec, self.input_name, self.output_name = spec, input_name, output_name
        self.datatype, self.max_batch = datatype, max_batch
        self.shape = tuple(int(d) for d in spec.shape)

    def check_rows(self, rows: int) -> None:
        if not 1 <= rows <= self.max_batch:
            raise _bad(f"a request holds 1..{self.max_batch} images, got {rows}")


class _Intake:
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

    async def read_body(self, request: Any, lease: Lease, start: float) -> bytearray:
        """The whole body (inflated), charged to ``lease``; 408 when the client stalls, 413 when too large."""
        declared = _content_length(request.headers)
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
            return await self.cpu(_inflate, body, encoding, self, lease)
        return body

    async def _receive_all(self, request: Any, lease: Lease, start: float) -> bytearray:
        """The body's bytes. A growing bytearray is cheap here: buffers of 1 MiB and more are mmapped in the
        serving process (`return_large_frees`), so growing one remaps pages instead of copying them, and
        the new pages are not zeroed by hand (a preallocated ``bytearray(n)`` is, with the GIL held)."""
        body = bytearray()
        while True:
            message = await self._receive(request, start)
            if message["type"] == "http.disconnect":
                raise HTTPFailure(499, "disconnected", "the client disconnected before sending its body")
            body += message.get("body", b"")
            if len(body) > self.body_limit:
                raise HTTPFailure(413, "too_large", f"request body over {self.body_limit} bytes",
                                  {"Connection": "close"})
            self.charge(lease, max(lease.held, len(body)), "this body")
            if not message.get("more_body", False):
                return body

    async def _receive(self, request: Any, start: float) -> dict[str, Any]:
        left = self.request_timeout - (time.perf_counter() - start)
        wait = min(self.body_timeout, left)
        try:
            if wait <= 0:
                raise asyncio.TimeoutError
            if sys.version_info < (3, 11):
                return await asyncio.wait_for(request.receive(), wait)
            async with asyncio.timeout(wait):  # a timer, not a task per chunk as wait_for makes
                return await request.receive()
        except asyncio.TimeoutError:
            what = (f"no data for {self.body_timeout:g} s" if wait == self.body_timeout
                    else f"not all sent within the {self.request_timeout:g} s request timeout")
            raise HTTPFailure(408, "body_timeout", f"request body {what}: the connection is closed",
                              {"Connection": "close"}) from None


class BearerKey:
    """ASGI middleware: every HTTP request but the ``public`` paths needs ``Authorization: Bearer <key>``."""

    def __init__(self, app: Any, key: str, public: tuple[str, ...] = ()) -> None:
        self.app, self.key, self.public = app, key, frozenset(public)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in self.public:
            auth = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            if not key_matches(auth, self.key):
                body = b'{"error": "this server needs an API key: send Authorization: Bearer <key>"}'
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)



def _forget_frames(e: BaseException) -> None:
    """Drop the locals of the frames a failure passed through (a body, an inflated buffer, parsed JSON): a
    traceback in a reference cycle would keep them until the next garbage collection, past the trim."""
    traceback.clear_frames(e.__traceback__)
    e.__traceback__ = None


def _digits(raw: str, limit: int = 18) -> int | None:
    """A non-negative decimal integer of ASCII digits only (``isdigit`` alone accepts '²'), or None."""
    raw = raw.strip()
    if not raw or len(raw) > limit or not raw.isascii() or not raw.isdigit():
        return None
    return int(raw)


def _content_length(headers: Any) -> int | None:
    raw = headers.get("content-length")
    return None if raw is None else _digits(raw)


def _top_k(raw: str | None, num_labels: int) -> int:
    if raw is None:
        return min(5, num_labels)
    k = _digits(raw, 9)
    if k is None or k < 1:
        raise _bad(f"top_k {raw[:20]!r} is not a whole number of at least 1")
    return min(k, num_labels)


def _binary_dims(raw: str | None, shape: tuple[int, ...], max_batch: int) -> tuple[int, ...]:
    """X-Shape checked before the body is read: [n, *shape] or shape, n within the batch limit."""
    if not raw:
        raise _bad("binary tensors need an X-Shape header such as 4,3,224,224")
    dims = tuple(_digits(v, 9) for v in raw.split(",")[:8])
    if not dims or any(d is None or d < 1 for d in dims) or len(raw.split(",")) > 8:
        raise _bad(f"X-Shape {raw[:60]!r} needs positive sizes, such as 4,3,224,224")
    full = dims if len(dims) == len(shape) + 1 else (1, *dims)
    if tuple(full[1:]) != shape:
        raise _bad(f"tensor shape {dims} does not match the model's [n, {', '.join(map(str, shape))}]")
    if full[0] > max_batch:
        raise _bad(f"a request holds 1..{max_batch} images, got {full[0]}")
    return dims  # type: ignore[return-value]


def _json_bytes(payload: Any) -> bytes:
    """JSON, never with NaN or Infinity in it (not JSON): a model answering those is broken."""
    try:
        return json.dumps(payload, allow_nan=False).encode()
    except ValueError:
        raise HTTPFailure(500, "non_finite_output", "the model answered NaN or infinite scores: this artifact "
                          "is broken; the server log has the details") from None


def _json_load(body: bytearray, end: int, lease: Lease, intake: _Intake, what: str) -> Any:
    """Parse ``body[:end]`` once its worst-case cost fits the memory budget; deep nesting is a 400, not a 500."""
    intake.settle(lease, len(body) + json_cost(body, end), what)
    try:
        # JSON between systems is UTF-8 (RFC 8259): decoding it here makes one str of the text's size, where
        # json.loads would guess UTF-16/32 from leading zero bytes and build a 4-byte-a-char buffer first
        return json.loads((body if end == len(body) else body[:end]).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _bad(f"{what} is not valid JSON") from None
    except RecursionError:
        raise _bad(f"{what} is nested too deeply") from None


def _checked(x: np.ndarray, model: _ModelIO) -> np.ndarray:
    if (reason := non_finite_reason(x, model.input_name)) is not None:
        raise _bad(reason)
    return x


def _multipart_file(body: bytes, content_type: str) -> bytes:
    """The 'file' field of a multipart/form-data body (in a worker thread: parsing is CPU work)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

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
            raise _bad("a multipart request holds at most 16 fields")
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
        raise _bad("unreadable multipart body: send multipart/form-data with the image in a 'file' field") from None
    for headers, data in parts:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        if disposition.get(b"name") == b"file" and b"filename" in disposition:
            return bytes(data)
    raise _bad("a multipart request needs a 'file' field holding the image")


class _V2Request:
    def __init__(self, x: np.ndarray, binary_output: bool, request_id: str | None) -> None:
        self.x, self.binary_output, self.request_id = x, binary_output, request_id


def _bad(message: str) -> HTTPFailure:
    return HTTPFailure(400, "bad_input", message)


def _v2_input(req: Any, model: _ModelIO) -> tuple[dict[str, Any], list[int]]:
    """The one input tensor of a v2 request and its shape, checked against the model before any data is read."""
    name, datatype = model.input_name, model.datatype
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or len(req["inputs"]) != 1:
        raise _bad(f'an inference request holds "inputs": [one tensor named {name!r}]')
    inp = req["inputs"][0]
    if not isinstance(inp, dict) or inp.get("name") != name:
        got = inp.get("name") if isinstance(inp, dict) else inp
        raise _bad(f"unknown input {str(got)[:64]!r}: this model's input is {name!r}")
    if inp.get("datatype") != datatype:
        raise _bad(f"input {name!r} has datatype {str(inp.get('datatype'))[:16]!r}; this model takes {datatype}")
    shape = inp.get("shape")
    if (not isinstance(shape, list) or len(shape) != len(model.shape) + 1
            or not all(type(d) is int and d >= 0 for d in shape) or tuple(shape[1:]) != model.shape):
        raise _bad(f"input {name!r} has shape {str(shape)[:80]}; this model takes "
                   f"[n, {', '.join(map(str, model.shape))}]")
    model.check_rows(shape[0])
    return inp, shape


def _parse_v2_request(body: Any, headers: Any, model: _ModelIO, lease: Lease, intake: _Intake) -> _V2Request:
    """A KServe v2 inference request (JSON, optionally followed by binary tensor data) -> the input batch."""
    raw_len = headers.get("inference-header-content-length")
    n = len(body) if raw_len is None else _digits(raw_len)
    if n is None or n > len(body):
        raise _bad(f"Inference-Header-Content-Length {raw_len[:20]!r} is not a length within the "
                   f"{len(body)}-byte body")
    binary = memoryview(body)[n:]
    req = _json_load(body, n, lease, intake, "the inference request header")
    inp, shape = _v2_input(req, model)
    dtype = np.dtype(model.spec.dtype).newbyteorder("<")
    count = math.prod(shape)  # Python ints: 2**54 * 3 * 224 * 224 does not wrap to 0 as np.prod does
    params = inp.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad(f'the "parameters" of input {model.input_name!r} is an object')
    size = params.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size != count * dtype.itemsize or len(binary) != size:
            raise _bad(f"input {model.input_name!r} of shape {shape} {model.datatype} needs "
                       f"{count * dtype.itemsize} bytes of binary data; binary_data_size is {str(size)[:20]} and "
                       f"the body holds {len(binary)}")
        intake.charge(lease, max(lease.held, 2 * len(body)), "this tensor")  # the body, and its copy in a batch
        x = np.frombuffer(binary, dtype).reshape(shape)
    else:
        if len(binary):
            raise _bad(f"{len(binary)} bytes of binary data follow the header, but no input has binary_data_size")
        if "data" not in inp:
            raise _bad(f'input {model.input_name!r} has neither "data" nor a binary_data_size parameter')
        x = _json_array(inp["data"], dtype, shape, model)
    return _V2Request(_checked(x, model), *_v2_output_options(req, model))


def _json_array(data: Any, dtype: np.dtype, shape: list[int], model: _ModelIO) -> np.ndarray:
    try:
        x = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise _bad(f"input {model.input_name!r}: data is not a list of {model.datatype} numbers") from None
    if x.size != math.prod(shape):
        raise _bad(f"input {model.input_name!r}: {x.size} values for shape {shape} ({math.prod(shape)} needed)")
    return x.reshape(shape)


def _v2_output_options(req: dict[str, Any], model: _ModelIO) -> tuple[bool, str | None]:
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad('"parameters" is an object')
    binary_output = bool(params.get("binary_data_output", False))
    outputs = req.get("outputs") or []
    if not isinstance(outputs, list):
        raise _bad('"outputs" is a list of output tensors')
    for out in outputs:
        if not isinstance(out, dict) or out.get("name") != model.output_name:
            got = out.get("name") if isinstance(out, dict) else out
            raise _bad(f"unknown output {str(got)[:64]!r}: this model's output is {model.output_name!r}")
        oparams = out.get("parameters") or {}
        if not isinstance(oparams, dict):
            raise _bad('an output\'s "parameters" is an object')
        if "classification" in oparams:
            raise _bad("the classification extension is not supported: ask for the logits, or use /v1/classify")
        binary_output = bool(oparams.get("binary_data", binary_output))
    rid = req.get("id")
    return binary_output, str(rid)[:256] if rid is not None else None


def _v2_response(out: np.ndarray, model_name: str, output_name: str, req: _V2Request) -> tuple[bytes, dict[str, str]]:
    out = np.ascontiguousarray(out, "<f4")
    tensor: dict[str, Any] = {"name": output_name, "datatype": "FP32", "shape": list(out.shape)}
    head: dict[str, Any] = {"model_name": model_name, "model_version": "1", "outputs": [tensor]}
    if req.request_id is not None:
        head["id"] = req.request_id
    if not req.binary_output:
        tensor["data"] = out.ravel().tolist()
        return _json_bytes(head), {}
    raw = out.tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    header = _json_bytes(head)
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def _inflate(body: bytearray, encoding: str, intake: _Intake, lease: Lease) -> bytearray:
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
        raise _bad(f"the body is not valid {encoding} data") from None
    return out


def _decode_tensor(body: bytearray, dims: tuple[int, ...] | None, model: _ModelIO, lease: Lease,
                   intake: _Intake) -> np.ndarray:
    """/v1/logits: float32 bytes shaped by X-Shape (``dims``, checked before the body was read), or JSON."""
    shape = model.shape
    if dims is not None:
        want = math.prod(dims) * 4
        if want != len(body):
            raise _bad(f"body has {len(body)} bytes; X-Shape {dims} float32 needs {want}")
        intake.settle(lease, 2 * len(body), "this tensor")  # the body, and its copy in a batch
        x = np.frombuffer(body, dtype="<f4").reshape(dims)
    else:
        payload = _json_load(body, len(body), lease, intake, "the JSON body")
        if not isinstance(payload, dict) or "inputs" not in payload:
            raise _bad('send JSON {"inputs": [...]} shaped [n, C, H, W], or float32 bytes with X-Shape')
        try:
            x = np.asarray(payload["inputs"], dtype=np.float32)
        except (TypeError, ValueError, OverflowError, RecursionError):
            raise _bad('"inputs" is not a list of numbers shaped [n, C, H, W]') from None
    if x.ndim == len(shape):
        x = x[None]
    if tuple(x.shape[1:]) != tuple(shape):
        raise _bad(f"tensor shape {tuple(x.shape)} does not match the model's [n, {', '.join(map(str, shape))}]")
    model.check_rows(x.shape[0])
    return _checked(x, model)


def _version() -> str:
    from vitdeploy import __version__

    return __version__


def uvicorn_config(app: Any, host: str = "127.0.0.1", port: int = 8000, graceful_timeout: float = 30.0,
                   log_level: str = "info", limit_concurrency: int | None = DEFAULT_LIMIT_CONCURRENCY,
                   keep_alive: float = DEFAULT_KEEP_ALIVE, header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                   ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> Any:
    """uvicorn's config with the limits for clients we do not know: a request-head timeout (our h11
    protocol), a keep-alive timeout, a connection limit (503 beyond it) and TLS when given a certificate."""
    import uvicorn

    from vitdeploy.serving.http11 import with_header_timeout

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=with_header_timeout(header_timeout),
                          limit_concurrency=limit_concurrency, timeout_keep_alive=max(1, int(keep_alive)),
                          timeout_graceful_shutdown=int(graceful_timeout), ssl_certfile=ssl_certfile,
                          ssl_keyfile=ssl_keyfile)


def run_server(app: Any, host: str = "127.0.0.1", port: int = 8000, drain_grace: float = DEFAULT_DRAIN_GRACE,
               graceful_timeout: float = 30.0, log_level: str = "info", **limits: Any) -> None:
    """Run ``app`` under uvicorn; the first Ctrl-C/SIGTERM reports draining, then stops after ``drain_grace``.

    During the grace period /readyz and /v2/health/ready answer 503 (so a load balancer stops sending)
    while requests are still served; then uvicorn stops accepting, finishes in-flight requests (up to
    ``graceful_timeout``) and the lifespan drains the batcher. A second signal stops at once.
    ``limits``: the keyword arguments of :func:`uvicorn_config` (connection limit, timeouts, TLS).
    """
    import uvicorn

    class DrainingServer(uvicorn.Server):
        timer: threading.Timer | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.timer is None and drain_grace > 0 and not self.should_exit:
                app.state.begin_drain()
                log.warning("draining: readiness now fails; stopping in %.1f s (Ctrl-C again to stop now)",
                            drain_grace)
                self.timer = threading.Timer(drain_grace, super().handle_exit, (sig, frame))
                self.timer.daemon = True
                self.timer.start()
                return
            if self.timer is not None:
                self.timer.cancel()
            super().handle_exit(sig, frame)

    return_large_frees()
    freeze_startup_objects()
    DrainingServer(uvicorn_config(app, host, port, graceful_timeout, log_level, **limits)).run()


def app_from_env() -> Any:
    """uvicorn factory for ``--workers N``: each worker process opens the artifact itself (and closes it)."""
    from vitdeploy.engines import open_runtime

    env = os.environ
    model = env.get("VITDEPLOY_SERVE_MODEL")
    if not model:
        raise VitDeployError("VITDEPLOY_SERVE_MODEL is not set")
    return_large_frees()
    runtime = open_runtime(model, backend=env.get("VITDEPLOY_SERVE_BACKEND", "auto"))
    pixels, budget = env.get("VITDEPLOY_SERVE_MAX_IMAGE_PIXELS"), env.get("VITDEPLOY_SERVE_MEMORY_BUDGET")
    app = create_app(runtime, int(env.get("VITDEPLOY_SERVE_MAX_BATCH", "32")),
                     float(env.get("VITDEPLOY_SERVE_MAX_DELAY_MS", "2")),
                     int(env.get("VITDEPLOY_SERVE_MAX_QUEUE", "256")),
                     request_timeout=float(env.get("VITDEPLOY_SERVE_REQUEST_TIMEOUT", "30")),
                     max_image_pixels=int(pixels) if pixels else None,
                     memory_budget=int(budget) if budget else None,
                     body_timeout=float(env.get("VITDEPLOY_SERVE_BODY_TIMEOUT", str(DEFAULT_BODY_TIMEOUT))),
                     api_key=env.get("VITDEPLOY_SERVE_API_KEY") or None,
                     public_probes=env.get("VITDEPLOY_SERVE_PUBLIC_PROBES") == "1",
                     model_name=env.get("VITDEPLOY_SERVE_NAME", "model"), owns_runtime=True)
    freeze_startup_objects()
    return app
