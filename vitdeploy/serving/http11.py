"""uvicorn's HTTP/1.1 protocols (httptools, else h11) with a request-head timeout, which uvicorn lacks.

A connection that has not sent a whole request head within ``header_timeout`` seconds of connecting
(or of its previous answer) is closed: clients that open connections and send nothing, or half a head,
hold no slot for long. uvicorn takes the class by import path (``http=...``), also with ``--workers``.
httptools (C) parses requests several times faster than h11 (pure Python), so it is used when installed
(the ``serve`` extra installs it); the head timeout behaves the same on both.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT = 10.0


class HeadTimeout:
    """Mixin for a uvicorn HTTP protocol: close the connection when no whole request head arrives within
    ``header_timeout`` seconds of connecting or of the previous answer."""

    header_timeout: float = float(os.environ.get("VITDEPLOY_SERVE_HEADER_TIMEOUT", DEFAULT_HEADER_TIMEOUT))
    _head_timer: asyncio.TimerHandle | None = None

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timeout)  # type: ignore[attr-defined]

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _waiting_for_head(self) -> bool:
        return True

    def _head_timeout(self) -> None:
        self._head_timer = None
        transport = self.transport  # type: ignore[attr-defined]
        if self._waiting_for_head() and not transport.is_closing():
            self.logger.info("closing a connection that sent no request head within %g s",  # type: ignore[attr-defined]
                             self.header_timeout)
            transport.close()

    def connection_made(self, transport: Any) -> None:
        super().connection_made(CorkedTransport(transport, self.loop))  # type: ignore[misc, attr-defined]
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing():  # type: ignore[attr-defined]
            self._arm_head_timer()

    def eof_received(self) -> Any:
        # a client that half-closes after its request: asyncio closes the socket transport itself when this
        # returns, so what is held goes out first
        self.transport.flush()  # type: ignore[attr-defined]
        return super().eof_received()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)  # type: ignore[misc]


class CorkedTransport:
    """A transport that sends a response's head and body as one ``send``: uvicorn writes them separately,
    two system calls and two TCP segments that each wake the client. A write is held until the next one
    (which sends both at once), the end of the event-loop step, a close, or the client's end of input
    (:meth:`HeadTimeout.eof_received`). Every write of the connection (the protocol's and each
    request's) goes through here, so their order holds."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._held: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if not data:  # h11 ends a message with b"": nothing to send, as for the transport itself
            return
        if self._held is None:
            self._held = [data]
            self._loop.call_soon(self.flush)
        else:
            self._held.append(data)
            self.flush()  # the head and its body: out now, in the request's own step as before

    def flush(self) -> None:
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(b) for b in self._held or ())

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, pause_reading, set_protocol, ...
        return getattr(self._transport, name)


class GuardedH11Protocol(HeadTimeout, H11Protocol):
    def _waiting_for_head(self) -> bool:
        return self.conn.their_state is h11.IDLE


def _guarded_httptools() -> type | None:
    """uvicorn's httptools protocol with the same head timeout, or None without httptools."""
    try:
        from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class GuardedHttpToolsProtocol(HeadTimeout, HttpToolsProtocol):
        def on_headers_complete(self) -> None:
            self._cancel_head_timer()  # a whole head: the request's own timeouts take over
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            """A chunk the request has not yet asked for is added to what waits (uvicorn's own way); one that
            finds nothing waiting is handed over as it came, where uvicorn would copy it into a buffer and out
            again: most chunks of a large body, since the request's task takes each before the next."""
            cycle = self.cycle
            if cycle.body or cycle.response_complete or self.parser.should_upgrade():
                super().on_body(body)
                return
            cycle.body = body
            if len(body) > HIGH_WATER_LIMIT:
                self.flow.pause_reading()
            cycle.message_event.set()

    return GuardedHttpToolsProtocol


def with_header_timeout(seconds: float) -> type:
    """The protocol class (httptools when installed, else h11) with its own head timeout, for one server."""
    base = _guarded_httptools() or GuardedH11Protocol
    return type(base.__name__, (base,), {"header_timeout": float(seconds)})


# what `serve --workers N` names by import path (each worker process reads the timeout from the environment)
GuardedProtocol = _guarded_httptools() or GuardedH11Protocol
