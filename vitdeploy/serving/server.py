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
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint annotations at run time
import asyncio
import io
import json
import logging
import os
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from vitdeploy.engines.base import softmax
from vitdeploy.errors import VitDeployError
from vitdeploy.serving.batcher import BatcherClosed, DynamicBatcher, QueueFull, RequestTimeout, WorkerDied

log = logging.getLogger("vitdeploy.serve")

DEFAULT_MAX_BODY = 20 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # ~ 7300 x 5500; decoding that takes ~120 MB
DEFAULT_DRAIN_GRACE = 5.0
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
               max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, model_name: str = "model",
               owns_runtime: bool = False) -> Any:
    """The FastAPI app. The runtime stays the caller's (closed at shutdown only with ``owns_runtime``).

    ``max_body_bytes`` defaults to 20 MiB or room for a full ``max_batch`` as JSON, whichever is larger.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect

    from vitdeploy.preprocess import ImageError, Preprocessing, open_image

    spec = runtime.spec
    item_bytes = int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize
    if max_body_bytes is None:
        max_body_bytes = max(DEFAULT_MAX_BODY, 6 * max_batch * item_bytes)
    body_limit: int = max_body_bytes

    registry = CollectorRegistry()
    m_requests = Counter("vitdeploy_requests", "HTTP requests", ["endpoint", "code"], registry=registry)
    m_errors = Counter("vitdeploy_errors", "Failed requests", ["endpoint", "reason"], registry=registry)
    m_latency = Histogram("vitdeploy_request_latency_seconds", "Request latency", ["endpoint"], registry=registry,
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
    m_batch = Histogram("vitdeploy_batch_size", "Rows per inference batch", registry=registry,
                        buckets=tuple(float(2**i) for i in range(11)))
    m_infer = Histogram("vitdeploy_inference_seconds", "Time per inference batch", registry=registry)
    m_queue = Gauge("vitdeploy_queue_depth", "Requests waiting for a batch", registry=registry)

    def on_batch(rows: int, seconds: float) -> None:
        m_batch.observe(rows)
        m_infer.observe(seconds)

    batcher = DynamicBatcher(runtime, max_batch, max_delay_ms, max_queue, on_batch=on_batch)
    m_queue.set_function(lambda: batcher.queue_depth)
    own_preprocess = getattr(runtime, "preprocess", None)
    labels = runtime.labels
    num_labels = len(labels) or int((runtime.metadata.config if runtime.metadata else {}).get("num_labels", -1))
    input_name = spec.name
    output_name = getattr(runtime, "output_name", None) or "logits"
    v2_dtype = V2_DATATYPES.get(spec.dtype, spec.dtype.upper())
    state = {"draining": False}

    def begin_drain() -> None:
        """From now on /readyz and /v2/health/ready answer 503; requests are still served."""
        state["draining"] = True

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        begin_drain()
        # uvicorn has finished in-flight requests; run what is queued, then release what we own
        await run_in_threadpool(batcher.shutdown, True, request_timeout)
        if owns_runtime:
            runtime.close()

    app = FastAPI(title="vitdeploy", version=_version(), lifespan=lifespan)
    app.state.batcher = batcher
    app.state.registry = registry
    app.state.begin_drain = begin_drain
    app.state.model_name = model_name

    def ready() -> bool:
        return not state["draining"] and batcher.alive

    def request_id(request: Request) -> str:
        return request.headers.get("x-request-id") or uuid.uuid4().hex[:16]

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

    def ok(endpoint: str, start: float, content: bytes, media_type: str, rid: str,
           headers: dict[str, str] | None = None) -> Any:
        m_latency.labels(endpoint).observe(time.perf_counter() - start)
        m_requests.labels(endpoint, "200").inc()
        return Response(content, media_type=media_type, headers={**(headers or {}), **closing(), "X-Request-ID": rid})

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > body_limit:
            raise HTTPFailure(413, "too_large", f"request body over {body_limit} bytes")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > body_limit:
                    raise HTTPFailure(413, "too_large", f"request body over {body_limit} bytes")
        except ClientDisconnect:
            raise HTTPFailure(499, "disconnected", "the client disconnected before sending its body") from None
        return _inflate(bytes(body), request.headers.get("content-encoding"), body_limit)

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
    def decode_image(body: bytes) -> np.ndarray:
        """Image bytes -> the model's input for one image; the header's size is checked before decoding."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(body)) as probe:  # reads the header only
                width, height = probe.size
        except Image.DecompressionBombError:
            width, height = 1 << 31, 1
        except Exception:  # unreadable: open_image says so in its own words
            width, height = 0, 0
        if width * height > max_image_pixels:
            raise HTTPFailure(413, "too_large", f"image of {width * height} pixels is over this server's limit of "
                              f"{max_image_pixels} (--max-image-pixels): send a smaller image")
        try:
            image = open_image(body)
        except ImageError as e:
            raise HTTPFailure(400, "bad_image", str(e)) from None
        if own_preprocess is not None:  # the batch form this artifact takes (float32 NCHW, or uint8 NHWC)
            return np.asarray(own_preprocess([image]))[0]
        return Preprocessing.from_dict(runtime.metadata.preprocessing)(image)

    async def form_file(request: Request, body: bytes) -> bytes:
        """The 'file' field of a multipart body already read (and size-checked)."""
        from starlette.formparsers import MultiPartException

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            async with Request(request.scope, replay).form(max_files=1, max_fields=16) as form:
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    raise HTTPFailure(400, "bad_input", "a multipart request needs a 'file' field holding the image")
                return await upload.read()
        except MultiPartException as e:
            raise HTTPFailure(400, "bad_input", f"unreadable multipart body: {e}") from None

    def top_k_json(logits: np.ndarray, k: int) -> bytes:
        probs = softmax(logits[None])[0]
        idx = np.argsort(-probs)[: max(1, k)]
        return json.dumps({"top_k": [{"label": labels[i] if i < len(labels) else str(i), "index": int(i),
                                      "score": float(probs[i])} for i in idx]}).encode()

    @app.post("/v1/classify")
    async def classify(request: Request, top_k: int = 5) -> Any:
        start, rid = time.perf_counter(), request_id(request)
        try:
            if runtime.metadata is None:
                raise HTTPFailure(400, "no_metadata", "this artifact has no preprocessing metadata: "
                                  "use /v1/logits or re-export it with vitdeploy")
            body = await read_body(request)
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                body = await form_file(request, body)
            if not body:
                raise HTTPFailure(400, "bad_input", "empty body: send image bytes")
            x = await run_in_threadpool(decode_image, body)
            logits = await infer(x, start)
            return ok("classify", start, await run_in_threadpool(top_k_json, logits, top_k), "application/json", rid)
        except HTTPFailure as e:
            return failure("classify", rid, e)
        except Exception as e:
            return unexpected("classify", rid, e)

    @app.post("/v1/logits")
    async def logits(request: Request) -> Any:
        start, rid = time.perf_counter(), request_id(request)
        try:
            body = await read_body(request)
            x = await run_in_threadpool(_decode_tensor, body, request.headers, spec.shape)
            out = await infer(x, start)
            if request.headers.get("accept") == "application/octet-stream":
                raw = await run_in_threadpool(lambda: np.ascontiguousarray(out, "<f4").tobytes())
                return ok("logits", start, raw, "application/octet-stream", rid,
                          {"X-Shape": ",".join(map(str, out.shape))})
            content = await run_in_threadpool(lambda: json.dumps({"logits": out.tolist()}).encode())
            return ok("logits", start, content, "application/json", rid)
        except HTTPFailure as e:
            return failure("logits", rid, e)
        except Exception as e:
            return unexpected("logits", rid, e)

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
                "inputs": [{"name": input_name, "datatype": v2_dtype, "shape": [-1, *spec.shape]}],
                "outputs": [{"name": output_name, "datatype": "FP32", "shape": [-1, num_labels]}]}

    @model_route("/ready")
    def v2_model_ready() -> Any:
        return Response(status_code=200 if ready() else 503)

    @model_route("/config")
    def v2_config() -> Any:
        return {"name": model_name, "platform": f"vitdeploy_{runtime.backend}", "max_batch_size": max_batch,
                "input": [{"name": input_name, "data_type": f"TYPE_{v2_dtype}", "dims": list(spec.shape)}],
                "output": [{"name": output_name, "data_type": "TYPE_FP32", "dims": [num_labels]}],
                "dynamic_batching": {"max_queue_delay_microseconds": int(max_delay_ms * 1000)}}

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_infer(request: Request, name: str, version: str | None = None) -> Any:
        start, rid = time.perf_counter(), request_id(request)
        if (bad := known(name, version)) is not None:
            return bad
        try:
            body = await read_body(request)
            req = await run_in_threadpool(_parse_v2_request, body, request.headers, spec, input_name, output_name,
                                          v2_dtype)
            out = await infer(req.x, start)
            content, headers = await run_in_threadpool(_v2_response, out, model_name, output_name, req)
            media = "application/octet-stream" if req.binary_output else "application/json"
            return ok("v2_infer", start, content, media, rid, headers)
        except HTTPFailure as e:
            return failure("v2_infer", rid, e, v2=True)
        except Exception as e:
            return unexpected("v2_infer", rid, e, v2=True)

    return app


class _V2Request:
    def __init__(self, x: np.ndarray, binary_output: bool, request_id: str | None) -> None:
        self.x, self.binary_output, self.request_id = x, binary_output, request_id


def _bad(message: str) -> HTTPFailure:
    return HTTPFailure(400, "bad_input", message)


def _parse_v2_request(body: bytes, headers: Any, spec: Any, input_name: str, output_name: str,
                      datatype: str) -> _V2Request:
    """A KServe v2 inference request (JSON, optionally followed by binary tensor data) -> the input batch."""
    raw_len = headers.get("inference-header-content-length")
    if raw_len is None:
        head, binary = body, b""
    else:
        if not raw_len.isdigit() or int(raw_len) > len(body):
            raise _bad(f"Inference-Header-Content-Length {raw_len!r} is not a length within the {len(body)}-byte body")
        head, binary = body[:int(raw_len)], body[int(raw_len):]
    try:
        req = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _bad("the inference request header is not valid JSON") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or len(req["inputs"]) != 1:
        raise _bad(f'an inference request holds "inputs": [one tensor named {input_name!r}]')
    inp = req["inputs"][0]
    if not isinstance(inp, dict) or inp.get("name") != input_name:
        got = inp.get("name") if isinstance(inp, dict) else inp
        raise _bad(f"unknown input {got!r}: this model's input is {input_name!r}")
    if inp.get("datatype") != datatype:
        raise _bad(f"input {input_name!r} has datatype {inp.get('datatype')!r}; this model takes {datatype}")
    shape = inp.get("shape")
    want = ", ".join(map(str, spec.shape))
    if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
            or tuple(shape[1:]) != tuple(spec.shape) or len(shape) != len(spec.shape) + 1):
        raise _bad(f"input {input_name!r} has shape {shape}; this model takes [n, {want}]")
    dtype = np.dtype(spec.dtype).newbyteorder("<")
    count = int(np.prod(shape))
    size = (inp.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if size != count * dtype.itemsize or len(binary) != size:
            raise _bad(f"input {input_name!r} of shape {shape} {datatype} needs {count * dtype.itemsize} bytes of "
                       f"binary data; binary_data_size is {size} and the body holds {len(binary)}")
        x = np.frombuffer(binary, dtype).reshape(shape)
    else:
        if binary:
            raise _bad(f"{len(binary)} bytes of binary data follow the header, but no input has binary_data_size")
        if "data" not in inp:
            raise _bad(f'input {input_name!r} has neither "data" nor a binary_data_size parameter')
        try:
            x = np.asarray(inp["data"], dtype=dtype)
        except (ValueError, TypeError, OverflowError):
            raise _bad(f"input {input_name!r}: data is not a list of {datatype} numbers") from None
        if x.size != count:
            raise _bad(f"input {input_name!r}: {x.size} values for shape {shape} ({count} needed)")
        x = x.reshape(shape)
    params = req.get("parameters") or {}
    binary_output = bool(params.get("binary_data_output", False))
    for out in req.get("outputs") or []:
        if not isinstance(out, dict) or out.get("name") != output_name:
            got = out.get("name") if isinstance(out, dict) else out
            raise _bad(f"unknown output {got!r}: this model's output is {output_name!r}")
        oparams = out.get("parameters") or {}
        if "classification" in oparams:
            raise _bad("the classification extension is not supported: ask for the logits, or use /v1/classify")
        binary_output = bool(oparams.get("binary_data", binary_output))
    rid = req.get("id")
    return _V2Request(x, binary_output, str(rid) if rid is not None else None)


def _v2_response(out: np.ndarray, model_name: str, output_name: str, req: _V2Request) -> tuple[bytes, dict[str, str]]:
    out = np.ascontiguousarray(out, "<f4")
    tensor: dict[str, Any] = {"name": output_name, "datatype": "FP32", "shape": list(out.shape)}
    head: dict[str, Any] = {"model_name": model_name, "model_version": "1", "outputs": [tensor]}
    if req.request_id is not None:
        head["id"] = req.request_id
    if not req.binary_output:
        tensor["data"] = out.ravel().tolist()
        return json.dumps(head).encode(), {}
    raw = out.tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps(head).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def _inflate(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo a gzip/deflate Content-Encoding (tritonclient's request compression), bounded by ``limit``."""
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise HTTPFailure(415, "bad_input", f"Content-Encoding {encoding!r} is not supported: use gzip or deflate")
    inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)  # gzip or zlib framing, told apart by the header
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise _bad(f"the body is not valid {encoding} data") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise HTTPFailure(413, "too_large", f"request body over {limit} bytes once decompressed")
    return out


def _decode_tensor(body: bytes, headers: Any, shape: tuple[int, ...]) -> np.ndarray:
    ctype = headers.get("content-type", "")
    if ctype.startswith("application/octet-stream"):
        raw = headers.get("x-shape")
        if not raw:
            raise _bad("binary tensors need an X-Shape header such as 4,3,224,224")
        try:
            dims = tuple(int(v) for v in raw.split(","))
        except ValueError:
            raise _bad(f"X-Shape {raw!r} is not comma-separated integers") from None
        if not dims or min(dims) < 1:
            raise _bad(f"X-Shape {raw!r} needs positive sizes, such as 4,3,224,224")
        if int(np.prod(dims)) * 4 != len(body):
            raise _bad(f"body has {len(body)} bytes; X-Shape {dims} float32 needs {int(np.prod(dims)) * 4}")
        x = np.frombuffer(body, dtype="<f4").reshape(dims)
    else:
        try:
            payload = json.loads(body)
            x = np.asarray(payload["inputs"], dtype=np.float32)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            raise _bad('send JSON {"inputs": [...]} shaped [n, C, H, W], or float32 bytes with X-Shape') from None
    if x.ndim == len(shape):
        x = x[None]
    if tuple(x.shape[1:]) != tuple(shape):
        raise _bad(f"tensor shape {tuple(x.shape)} does not match the model's [n, {', '.join(map(str, shape))}]")
    return x


def _version() -> str:
    from vitdeploy import __version__

    return __version__


def run_server(app: Any, host: str = "127.0.0.1", port: int = 8000, drain_grace: float = DEFAULT_DRAIN_GRACE,
               graceful_timeout: float = 30.0, log_level: str = "info") -> None:
    """Run ``app`` under uvicorn; the first Ctrl-C/SIGTERM reports draining, then stops after ``drain_grace``.

    During the grace period /readyz and /v2/health/ready answer 503 (so a load balancer stops sending)
    while requests are still served; then uvicorn stops accepting, finishes in-flight requests (up to
    ``graceful_timeout``) and the lifespan drains the batcher. A second signal stops at once.
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

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(graceful_timeout))
    DrainingServer(config).run()


def app_from_env() -> Any:
    """uvicorn factory for ``--workers N``: each worker process opens the artifact itself (and closes it)."""
    from vitdeploy.engines import open_runtime

    env = os.environ
    model = env.get("VITDEPLOY_SERVE_MODEL")
    if not model:
        raise VitDeployError("VITDEPLOY_SERVE_MODEL is not set")
    runtime = open_runtime(model, backend=env.get("VITDEPLOY_SERVE_BACKEND", "auto"))
    return create_app(runtime, int(env.get("VITDEPLOY_SERVE_MAX_BATCH", "32")),
                      float(env.get("VITDEPLOY_SERVE_MAX_DELAY_MS", "2")),
                      int(env.get("VITDEPLOY_SERVE_MAX_QUEUE", "256")),
                      request_timeout=float(env.get("VITDEPLOY_SERVE_REQUEST_TIMEOUT", "30")),
                      max_image_pixels=int(env.get("VITDEPLOY_SERVE_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_IMAGE_PIXELS))),
                      model_name=env.get("VITDEPLOY_SERVE_NAME", "model"), owns_runtime=True)
