"""The inference routes of `vitdeploy serve` as plain ASGI, ahead of FastAPI.

The profile of `serve` under load (issue 21) spent half of the event loop's time in the framework's
layers around each inference request: FastAPI's request/response classes, its parameter binding, and
six middlewares that each wrap ``send`` and ``receive``. Inference requests are the hot path, so
:class:`ServingApp` answers them itself, as Triton's HTTP frontend does: one match on method and path,
one request scope (request id, memory lease, metrics, error mapping: :mod:`vitdeploy.serving.middleware`),
the handler, and the answer (its head and body leave in one write: :mod:`vitdeploy.serving.http11`).
Every other route (probes, metadata, /metrics, OpenAPI) stays a FastAPI route, behind the same bearer key.

A handler is ``async (request, scope, **path_params) -> Answer``; it raises
:class:`~vitdeploy.serving.errors.HTTPFailure` for a request it cannot answer. Whatever else it raises is
logged with the request id and answered with a generic 500.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request

from vitdeploy.serving.errors import HTTPFailure, failure_body, forget_frames, internal_error
from vitdeploy.serving.middleware import Answer, BearerKey, Metrics, RequestScope

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class RawRequest:
    """What a handler reads of a request: lower-case ``headers`` (the first of repeated ones, as Starlette
    gives), ``query_params`` and ``receive``."""

    __slots__ = ("_query", "headers", "receive", "scope")

    def __init__(self, scope: dict[str, Any], receive: Receive) -> None:
        self.scope, self.receive = scope, receive
        self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(scope["headers"])}
        self._query: dict[str, str] | None = None

    @property
    def query_params(self) -> dict[str, str]:
        if self._query is None:
            self._query = dict(parse_qsl(self.scope.get("query_string", b"").decode("latin-1"),
                                         keep_blank_values=True))
        return self._query


Handler = Callable[..., Awaitable[Answer]]


class _Route(NamedTuple):
    path: str
    pattern: re.Pattern[str]
    method: str
    handler: Handler
    endpoint: str


class InferenceRoutes:
    """The routes :class:`ServingApp` answers without the framework, and how it answers them."""

    def __init__(self, plane: Any, metrics: Metrics, key: BearerKey | None = None) -> None:
        self.plane, self.metrics, self.key = plane, metrics, key
        self.routes: list[_Route] = []

    def add(self, path: str, handler: Handler, endpoint: str, method: str = "POST") -> None:
        """``path`` in FastAPI's form: ``{name}`` matches one path segment, passed to the handler by name."""
        regex = re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(path))
        self.routes.append(_Route(path, re.compile(regex), method, handler, endpoint))

    def match(self, scope: dict[str, Any]) -> tuple[_Route, dict[str, str]] | None:
        path = scope["path"]
        for route in self.routes:
            if (m := route.pattern.fullmatch(path)) is not None:
                return route, m.groupdict()
        return None

    async def serve(self, route: _Route, params: dict[str, str], scope: dict[str, Any], receive: Receive,
                    send: Send) -> None:
        if self.key is not None and await self.key.refuse(scope, send):
            return
        if scope["method"] != route.method:
            await _send(send, Answer(405, b'{"detail": "Method Not Allowed"}', "application/json",
                                     {"Allow": route.method}))
            return
        request = RawRequest(scope, receive)
        rs = RequestScope(request, route.endpoint, self.plane, self.metrics)
        try:
            try:
                answer = await route.handler(request, rs, **params)
            except HTTPFailure as e:
                answer = _failed(rs, e)
            except Exception as e:
                failure = internal_error(route.endpoint, rs.rid, e)
                forget_frames(e)
                answer = _failed(rs, failure)
        finally:
            rs.release()
        await _send(send, answer)


def _failed(rs: RequestScope, e: HTTPFailure) -> Answer:
    """The JSON answer for a failure, counted by the request's scope."""
    forget_frames(e)
    rs.failed(e)
    return Answer(e.code, failure_body(e, rs.rid if not rs.v2 else None), "application/json",
                  {**e.headers, **rs.headers()})


async def _send(send: Send, answer: Answer) -> None:
    headers = [(b"content-length", str(len(answer.body)).encode()), (b"content-type", answer.media_type.encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


class ServingApp(FastAPI):
    """FastAPI, with :attr:`inference` routes answered before the framework sees them."""

    inference: InferenceRoutes | None = None

    def serve_inference(self, routes: InferenceRoutes) -> None:
        """Answer ``routes`` ahead of the framework. They are listed in FastAPI's router too, never reached
        there: OpenAPI shows them, and a path with a trailing slash gets the router's redirect to them."""
        self.inference = routes
        for route in routes.routes:
            doc = (getattr(route.handler, "__doc__", None) or "").strip() or None
            self.router.add_api_route(route.path, _answered_ahead, methods=[route.method], name=route.endpoint,
                                      description=doc, include_in_schema=True)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if self.inference is not None and scope["type"] == "http":
            found = self.inference.match(scope)
            if found is not None:
                await self.inference.serve(*found, scope, receive, send)
                return
        await super().__call__(scope, receive, send)


async def _answered_ahead(request: Request) -> Any:
    """The FastAPI entry of an inference route: :class:`ServingApp` answers the request before this is reached."""
    raise RuntimeError(f"{request.url.path} is answered by ServingApp.inference, not by FastAPI's router")
