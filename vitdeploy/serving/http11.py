"""uvicorn's HTTP/1.1 (h11) protocol with a request-head timeout, which h11 and uvicorn lack.

A connection that has not sent a whole request head within ``header_timeout`` seconds of connecting
(or of its previous answer) is closed: clients that open connections and send nothing, or half a head,
hold no slot for long. uvicorn takes the class by import path (``http=...``), also with ``--workers``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT = 10.0


class GuardedH11Protocol(H11Protocol):
    header_timeout: float = float(os.environ.get("VITDEPLOY_SERVE_HEADER_TIMEOUT", DEFAULT_HEADER_TIMEOUT))
    _head_timer: asyncio.TimerHandle | None = None

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("closing a connection that sent no request head within %g s", self.header_timeout)
            self.transport.close()

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)


def with_header_timeout(seconds: float) -> type[GuardedH11Protocol]:
    """The protocol class with its own head timeout (for one server in this process)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout": float(seconds)})
