"""`vitdeploy serve`: an HTTP server (FastAPI + uvicorn) over a DynamicBatcher.

Imports no torch: a serving install (``vitdeploy[serve]`` with ONNX Runtime or TensorRT) serves an
ONNX file or an engine, with preprocessing and labels from the artifact's metadata.

The shape follows KServe's Python server: a :class:`~vitdeploy.serving.dataplane.DataPlane` holds the
runtime, the batcher, the memory budget and the server's state; the v1 routes
(:mod:`vitdeploy.serving.v1`: /v1/classify, /v1/logits, /healthz, /readyz, /metrics) and the KServe v2 /
Triton routes (:mod:`vitdeploy.serving.v2`) are classes over it whose handlers parse, call it and
encode. The inference routes are answered as plain ASGI ahead of FastAPI (:mod:`vitdeploy.serving.asgi`):
each request's id, memory lease, metrics and the mapping of its failure to a response live in one request
scope (:mod:`vitdeploy.serving.middleware`). :func:`create_app` only wires these together.

Large CPU work (decoding images, JSON, inflating, big tensors) runs in a worker thread, never on the
event loop; a small binary tensor is read in place, and the input check runs in the batcher's worker.
A request's timeout covers its whole life. Errors the server did not foresee are logged with a
request id; the client gets a generic message and that id, never the exception's text.

Hostile clients (issue 18): each request's decode and parse work is charged to a memory budget before
it runs (a request that cannot fit gets 413 before it is parsed; one that must wait too long, 503); the
body has an idle read timeout and the whole request the request timeout; uvicorn adds a head timeout
(:mod:`vitdeploy.serving.http11`), a keep-alive timeout and a connection limit. Non-finite input is
refused; an optional bearer key guards every route (probes too, unless made public).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from vitdeploy.engines.base import Runtime
from vitdeploy.errors import VitDeployError
from vitdeploy.serving.errors import HTTPFailure
from vitdeploy.serving.limits import (
    MemoryBudget,
    api_key_problem,
    default_max_image_pixels,
    default_memory_budget,
    freeze_startup_objects,
    non_finite_reason,
    return_large_frees,
)
from vitdeploy.serving.middleware import BearerKey
from vitdeploy.serving.parsing import INFLATE_STEP, V2_DATATYPES

__all__ = ["DEFAULT_MAX_BODY", "INFLATE_STEP", "PROBES", "V2_DATATYPES", "BearerKey", "HTTPFailure", "app_from_env",
           "check_port", "create_app", "run_server", "uvicorn_config"]

log = logging.getLogger("vitdeploy.serve")

DEFAULT_MAX_BODY = 20 * 1024 * 1024
DEFAULT_DRAIN_GRACE = 5.0
DEFAULT_BODY_TIMEOUT = 10.0  # seconds without a byte of the body before the request is dropped (408)
DEFAULT_LIMIT_CONCURRENCY = 512  # connections and requests at once; uvicorn answers 503 beyond
DEFAULT_KEEP_ALIVE = 5
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds to send a whole request head (vitdeploy.serving.http11)
PROBES = ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready")


def create_app(runtime: Runtime, max_batch: int = 32, max_delay_ms: float = 2.0, max_queue: int = 256,
               request_timeout: float = 30.0, max_body_bytes: int | None = None,
               max_image_pixels: int | None = None, model_name: str = "model", owns_runtime: bool = False,
               memory_budget: int | None = None, body_timeout: float = DEFAULT_BODY_TIMEOUT,
               api_key: str | None = None, public_probes: bool = False,
               prepare: Callable[[Any], Any] | None = None, adaptive_delay: bool = True) -> Any:
    """The FastAPI app. The runtime stays the caller's (closed at shutdown only with ``owns_runtime``).

    ``max_body_bytes`` defaults to 20 MiB or room for a full ``max_batch`` as JSON, whichever is larger;
    ``memory_budget`` (bytes of decode and parse work at once) to room for one such JSON request, at
    least 256 MiB; ``max_image_pixels`` to 256x the model's input area. With ``api_key`` every route
    wants ``Authorization: Bearer <key>``; ``public_probes`` exempts the health, readiness and metrics probes.
    The batcher keeps ``runtime.instances`` batches in flight (one worker thread each). With
    ``adaptive_delay`` a batch waits (up to ``max_delay_ms``) only while requests it could take are still
    being read; without it, every batch that is not full waits ``max_delay_ms``, as Triton's does.
    ``prepare(runtime)`` (warm-up and the golden check: :func:`vitdeploy.serving.readiness.warm_and_verify`)
    starts in the background now; readiness waits for it, and stays 503 with its error if it fails.
    """
    import functools
    from contextlib import asynccontextmanager

    from starlette.concurrency import run_in_threadpool

    from vitdeploy.serving.asgi import InferenceRoutes, ServingApp
    from vitdeploy.serving.dataplane import DataPlane
    from vitdeploy.serving.middleware import Metrics
    from vitdeploy.serving.parsing import ModelIO
    from vitdeploy.serving.v1 import V1Endpoints
    from vitdeploy.serving.v2 import V2Endpoints

    if api_key is not None and (problem := api_key_problem(api_key)) is not None:
        raise VitDeployError(problem)
    intake = _intake(runtime.spec, max_batch, max_body_bytes, memory_budget, body_timeout, request_timeout)
    budget, metrics = intake.budget, Metrics()
    # as many batches in flight as the runtime runs at once (TensorRT contexts); duck-typed test runtimes: one
    workers = max(1, runtime.instances)
    plane = DataPlane(runtime, budget, max_batch, max_delay_ms, max_queue, request_timeout,
                      on_batch=metrics.on_batch, workers=workers, adaptive_delay=adaptive_delay,
                      screen=functools.partial(non_finite_reason, input_name=runtime.spec.name))
    metrics.watch(plane)
    model = ModelIO.of(runtime, max_batch)
    if prepare is not None:
        plane.prepare(prepare, "warming up and verifying the model")

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        plane.begin_drain()
        # uvicorn has finished in-flight requests; run what is queued, then release what we own
        await run_in_threadpool(plane.shutdown, owns_runtime)

    app = ServingApp(title="vitdeploy", version=_version(), lifespan=lifespan)
    key = BearerKey(None, key=api_key, public=PROBES if public_probes else ()) if api_key else None
    if api_key:
        app.add_middleware(BearerKey, key=api_key, public=PROBES if public_probes else ())
    inference = InferenceRoutes(plane, metrics, key)
    pixel_limit = max_image_pixels or default_max_image_pixels(runtime.spec.shape)
    for endpoints in (V1Endpoints(plane, intake, model, metrics, pixel_limit),
                      V2Endpoints(plane, intake, model, model_name, _version())):
        endpoints.register(app)
        endpoints.register_inference(inference)
    app.serve_inference(inference)
    for key, value in {"dataplane": plane, "batcher": plane.batcher, "registry": metrics.registry,
                       "begin_drain": plane.begin_drain, "model_name": model_name, "memory_budget": budget,
                       "max_image_pixels": pixel_limit}.items():
        setattr(app.state, key, value)
    return app


def _intake(spec: Any, max_batch: int, max_body_bytes: int | None, memory_budget: int | None, body_timeout: float,
            request_timeout: float) -> Any:
    """The body reader with create_app's defaults for the body limit and the memory budget."""
    from vitdeploy.serving.parsing import Intake

    item_bytes = math.prod(spec.shape) * np.dtype(spec.dtype).itemsize
    budget = MemoryBudget(memory_budget or default_memory_budget(item_bytes, max_batch))
    return Intake(budget, max_body_bytes or max(DEFAULT_MAX_BODY, 6 * max_batch * item_bytes), body_timeout,
                  request_timeout)


def _version() -> str:
    from vitdeploy import __version__

    return __version__


def uvicorn_config(app: Any, host: str = "127.0.0.1", port: int = 8000, graceful_timeout: float = 30.0,
                   log_level: str = "info", limit_concurrency: int | None = DEFAULT_LIMIT_CONCURRENCY,
                   keep_alive: float = DEFAULT_KEEP_ALIVE, header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                   ssl_certfile: str | None = None, ssl_keyfile: str | None = None, access_log: bool = False) -> Any:
    """uvicorn's config with the limits for clients we do not know: a request-head timeout (our HTTP
    protocol), a keep-alive timeout, a connection limit (503 beyond it) and TLS when given a certificate.
    No line per request unless ``access_log`` (as Triton: /metrics counts requests)."""
    import uvicorn

    from vitdeploy.serving.http11 import with_header_timeout

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=with_header_timeout(header_timeout),
                          limit_concurrency=limit_concurrency, timeout_keep_alive=max(1, int(keep_alive)),
                          timeout_graceful_shutdown=int(graceful_timeout), ssl_certfile=ssl_certfile,
                          ssl_keyfile=ssl_keyfile, access_log=access_log)


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
    server = DrainingServer(uvicorn_config(app, host, port, graceful_timeout, log_level, **limits))
    try:
        server.run()
    except SystemExit:
        if server.started:
            raise
        # uvicorn could not listen (its log says why) and exits: the warm-up thread must not be inside the
        # runtime as the caller closes it and the process ends (that aborts the process)
        app.state.dataplane.finish_preparing(graceful_timeout)
        check_port(host, port)
        raise VitDeployError(f"could not listen on {host}:{port} (the log above says why)") from None


def check_port(host: str, port: int) -> None:
    """VitDeployError (one line) when ``host:port`` cannot be listened on, bound as uvicorn binds it
    (SO_REUSEADDR): before anything starts, so that nothing runs in the background when the server cannot."""
    import errno
    import socket

    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise VitDeployError(f"--host {host!r} is not an address of this machine ({e.strerror})") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise VitDeployError(f"port {port} is in use on {host}: stop what listens there, or pick "
                                         "another --port") from None
                raise VitDeployError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def app_from_env() -> Any:
    """uvicorn factory for ``--workers N``: each worker process opens the artifact itself (and closes it)."""
    from vitdeploy.engines import open_runtime
    from vitdeploy.serving.readiness import warm_and_verify

    env = os.environ
    model = env.get("VITDEPLOY_SERVE_MODEL")
    if not model:
        raise VitDeployError("VITDEPLOY_SERVE_MODEL is not set")
    return_large_frees()
    instances = int(env.get("VITDEPLOY_SERVE_INSTANCES", "1"))
    max_batch = int(env.get("VITDEPLOY_SERVE_MAX_BATCH", "32"))
    # before the runtime opens the file: the golden check vouches only for the bytes that were loaded
    prepare = warm_and_verify(model, max_batch, verify=env.get("VITDEPLOY_SERVE_VERIFY", "1") == "1",
                              allow_drift=env.get("VITDEPLOY_SERVE_ALLOW_DRIFT") == "1",
                              require=env.get("VITDEPLOY_SERVE_REQUIRE_VERIFIED") == "1")
    runtime = open_runtime(model, backend=env.get("VITDEPLOY_SERVE_BACKEND", "auto"), shared_cores=True,
                           **({"instances": instances} if instances > 1 else {}))
    pixels, budget = env.get("VITDEPLOY_SERVE_MAX_IMAGE_PIXELS"), env.get("VITDEPLOY_SERVE_MEMORY_BUDGET")
    app = create_app(runtime, max_batch,
                     float(env.get("VITDEPLOY_SERVE_MAX_DELAY_MS", "2")),
                     int(env.get("VITDEPLOY_SERVE_MAX_QUEUE", "256")),
                     request_timeout=float(env.get("VITDEPLOY_SERVE_REQUEST_TIMEOUT", "30")),
                     max_image_pixels=int(pixels) if pixels else None,
                     memory_budget=int(budget) if budget else None,
                     body_timeout=float(env.get("VITDEPLOY_SERVE_BODY_TIMEOUT", str(DEFAULT_BODY_TIMEOUT))),
                     api_key=env.get("VITDEPLOY_SERVE_API_KEY") or None,
                     public_probes=env.get("VITDEPLOY_SERVE_PUBLIC_PROBES") == "1",
                     model_name=env.get("VITDEPLOY_SERVE_NAME", "model"), owns_runtime=True,
                     adaptive_delay=env.get("VITDEPLOY_SERVE_FIXED_DELAY") != "1",
                     prepare=prepare)
    freeze_startup_objects()
    return app
