"""Both HTTP protocols serve closes a connection that sends no whole request head in time, and only that."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from vitdeploy.io import free_port
from vitdeploy.serving import http11


async def _app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def _protocols():
    out = [("h11", http11.GuardedH11Protocol)]
    tools = http11._guarded_httptools()
    if tools is not None:
        out.append(("httptools", tools))
    return out


@pytest.mark.parametrize(("name", "protocol"), _protocols(), ids=[n for n, _ in _protocols()])
def test_head_timeout(name, protocol):
    import uvicorn

    port = free_port()
    cls = type(protocol.__name__, (protocol,), {"header_timeout": 0.5})
    server = uvicorn.Server(uvicorn.Config(_app, host="127.0.0.1", port=port, http=cls, log_level="error",
                                           loop="asyncio"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as idle, \
                socket.create_connection(("127.0.0.1", port), timeout=5) as polite:
            idle.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # half a head, then nothing
            polite.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert polite.recv(1024).startswith(b"HTTP/1.1 200")
            t0 = time.monotonic()
            assert idle.recv(1024) == b""  # closed by the server
            assert 0.2 < time.monotonic() - t0 < 3
    finally:
        server.should_exit = True
        thread.join(10)
