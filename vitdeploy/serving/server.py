"""`vitdeploy serve`: an HTTP server (FastAPI + uvicorn) over a DynamicBatcher.

Imports no torch: a serving install (``vitdeploy[serve]`` with ONNX Runtime or TensorRT) serves an
ONNX file or an engine, with preprocessing and labels from the artifact's metadata.

    POST /v1/classify   image bytes (or multipart field "file"); ?top_k=5
    POST /v1/logits     JSON {"inputs": [[C][H][W]...]} or application/octet-stream float32 with X-Shape: n,C,H,W
    GET  /healthz       the process is up
    GET  /readyz        the model is loaded and the server is not draining
    GET  /metrics       Prometheus text format
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint annotations at run time
import os
import time
from typing import Any

import numpy as np

from vitdeploy.engines.base import softmax
from vitdeploy.errors import VitDeployError
from vitdeploy.serving.batcher import BatcherClosed, DynamicBatcher, QueueFull, RequestTimeout

DEFAULT_MAX_BODY = 20 * 1024 * 1024


def create_app(runtime: Any, max_batch: int = 32, max_delay_ms: float = 2.0, max_queue: int = 256,
               request_timeout: float = 30.0, max_body_bytes: int = DEFAULT_MAX_BODY) -> Any:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    from vitdeploy.preprocess import ImageError, Preprocessing, open_image

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
    prep = Preprocessing.from_dict(runtime.metadata.preprocessing) if runtime.metadata else None
    labels = runtime.labels
    state = {"draining": False}

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        state["draining"] = True
        batcher.shutdown(drain=True)  # uvicorn has finished in-flight requests; run what is queued
        runtime.close()

    app = FastAPI(title="vitdeploy", version=_version(), lifespan=lifespan)
    app.state.batcher = batcher
    app.state.registry = registry

    def error(endpoint: str, code: int, reason: str, message: str, headers: dict[str, str] | None = None) -> Any:
        m_errors.labels(endpoint, reason).inc()
        m_requests.labels(endpoint, str(code)).inc()
        return JSONResponse({"error": message}, status_code=code, headers=headers)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise _TooLarge()
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise _TooLarge()
        return bytes(body)

    async def run(endpoint: str, x: np.ndarray, start: float) -> Any:
        try:
            out = await batcher.submit_async(x, timeout=request_timeout)
        except QueueFull as e:
            return None, error(endpoint, 503, "overload", str(e), {"Retry-After": "1"})
        except (BatcherClosed, RequestTimeout) as e:
            return None, error(endpoint, 503, "unavailable", str(e), {"Retry-After": "1"})
        except ValueError as e:
            return None, error(endpoint, 400, "bad_input", str(e))
        except Exception as e:
            return None, error(endpoint, 500, "inference", f"inference failed: {type(e).__name__}: {e}")
        m_latency.labels(endpoint).observe(time.perf_counter() - start)
        m_requests.labels(endpoint, "200").inc()
        return out, None

    @app.post("/v1/classify")
    async def classify(request: Request, top_k: int = 5) -> Any:
        start = time.perf_counter()
        if prep is None:
            return error("classify", 400, "no_metadata", "this artifact has no preprocessing metadata")
        try:
            body = await read_body(request)
        except _TooLarge:
            return error("classify", 413, "too_large", f"request body over {max_body_bytes} bytes")
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            request._body = body  # starlette parses the form from the body already read (and size-checked)
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                return error("classify", 400, "bad_input", "multipart request needs a 'file' field")
            body = await upload.read()
        if not body:
            return error("classify", 400, "bad_input", "empty body: send image bytes")
        try:
            x = prep(open_image(body))
        except ImageError as e:
            return error("classify", 400, "bad_image", str(e))
        logits, failure = await run("classify", x, start)
        if failure is not None:
            return failure
        probs = softmax(logits[None])[0]
        idx = np.argsort(-probs)[: max(1, top_k)]
        return {"top_k": [{"label": labels[i] if i < len(labels) else str(i), "index": int(i),
                           "score": float(probs[i])} for i in idx]}

    @app.post("/v1/logits")
    async def logits(request: Request) -> Any:
        start = time.perf_counter()
        try:
            body = await read_body(request)
        except _TooLarge:
            return error("logits", 413, "too_large", f"request body over {max_body_bytes} bytes")
        try:
            x = _decode_tensor(body, request.headers, runtime.spec.shape)
        except ValueError as e:
            return error("logits", 400, "bad_input", str(e))
        out, failure = await run("logits", x, start)
        if failure is not None:
            return failure
        if request.headers.get("accept") == "application/octet-stream":
            return Response(np.ascontiguousarray(out, np.float32).tobytes(), media_type="application/octet-stream",
                            headers={"X-Shape": ",".join(map(str, out.shape))})
        return {"logits": out.tolist()}

    @app.get("/healthz")
    async def healthz() -> Any:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Any:
        if state["draining"]:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ready", "model": runtime.describe(), "max_batch": max_batch}

    @app.get("/metrics")
    async def metrics() -> Any:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


class _TooLarge(Exception):
    pass


def _decode_tensor(body: bytes, headers: Any, shape: tuple[int, ...]) -> np.ndarray:
    ctype = headers.get("content-type", "")
    if ctype.startswith("application/octet-stream"):
        raw = headers.get("x-shape")
        if not raw:
            raise ValueError("binary tensors need an X-Shape header such as 4,3,224,224")
        try:
            dims = tuple(int(v) for v in raw.split(","))
        except ValueError:
            raise ValueError(f"X-Shape {raw!r} is not comma-separated integers") from None
        if int(np.prod(dims)) * 4 != len(body):
            raise ValueError(f"body has {len(body)} bytes; X-Shape {dims} float32 needs {int(np.prod(dims)) * 4}")
        x = np.frombuffer(body, dtype="<f4").reshape(dims)
    else:
        import json

        try:
            payload = json.loads(body)
            x = np.asarray(payload["inputs"], dtype=np.float32)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ValueError('send JSON {"inputs": [...]} shaped [n, C, H, W], or float32 bytes with X-Shape') from None
    if x.ndim == len(shape):
        x = x[None]
    if tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"tensor shape {tuple(x.shape)} does not match the model's [n, {', '.join(map(str, shape))}]")
    return x


def _version() -> str:
    from vitdeploy import __version__

    return __version__


def app_from_env() -> Any:
    """uvicorn factory for ``--workers N``: each worker process opens the artifact itself."""
    from vitdeploy.engines import open_runtime

    env = os.environ
    model = env.get("VITDEPLOY_SERVE_MODEL")
    if not model:
        raise VitDeployError("VITDEPLOY_SERVE_MODEL is not set")
    runtime = open_runtime(model, backend=env.get("VITDEPLOY_SERVE_BACKEND", "auto"))
    return create_app(runtime, int(env.get("VITDEPLOY_SERVE_MAX_BATCH", "32")),
                      float(env.get("VITDEPLOY_SERVE_MAX_DELAY_MS", "2")),
                      int(env.get("VITDEPLOY_SERVE_MAX_QUEUE", "256")))
