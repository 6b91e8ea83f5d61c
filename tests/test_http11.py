"""Both HTTP protocols serve closes a connection that sends no whole request head in time, and only that."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def _running(app, protocol):
    """uvicorn serving ``app`` over ``protocol`` on a free loopback port, in a thread: yields the port."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol, log_level="error",
                                           loop="asyncio"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.parametrize(("name", "protocol"), _protocols(), ids=[n for n, _ in _protocols()])
def test_head_timeout(name, protocol):
    cls = type(protocol.__name__, (protocol,), {"header_timeout": 0.5})
    with _running(_app, cls) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as idle, \
            socket.create_connection(("127.0.0.1", port), timeout=5) as polite:
        idle.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # half a head, then nothing
        polite.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert polite.recv(1024).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        assert idle.recv(1024) == b""  # closed by the server
        assert 0.2 < time.monotonic() - t0 < 3


async def _echo_path(scope, receive, send):
    if scope["type"] != "http":
        return
    body = scope["path"].encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Recorder:
    """The socket's transport, recording each write the protocol stack makes to it."""

    def __init__(self, transport, writes):
        self._transport, self.writes = transport, writes

    def write(self, data):
        self.writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name):
        return getattr(self._transport, name)


@pytest.mark.parametrize(("name", "protocol"), _protocols(), ids=[n for n, _ in _protocols()])
def test_one_write_per_response_in_order(name, protocol):
    """A response's head and body leave in one write (one send, one TCP segment to wake the client), and
    pipelined requests, a malformed one among them, are answered in order."""
    writes: list[bytes] = []

    class Recording(protocol):
        def connection_made(self, transport):
            super().connection_made(_Recorder(transport, writes))

    with _running(_echo_path, Recording) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
            assert c.recv(4096).endswith(b"\r\n\r\n/first")
            assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 200") and writes[0].endswith(b"/first")
            c.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while got.count(b"HTTP/1.1") < 2 or not got.endswith(b"/b"):
                got += c.recv(4096)
            c.sendall(b"NOT HTTP\r\n\r\n")  # the protocol's own answer, after the requests' ones
            while chunk := c.recv(4096):
                got += chunk
        assert got.index(b"\r\n\r\n/a") < got.index(b"\r\n\r\n/b") < got.index(b"HTTP/1.1 400"), got
        answers = [w for w in writes if w.startswith(b"HTTP/1.1 200")]  # each with its body, in one write
        assert [w.rsplit(b"\r\n\r\n", 1)[1] for w in answers] == [b"/first", b"/a", b"/b"], writes
        for _ in range(5):  # a client that half-closes after its request still gets the answer
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                c.sendall(b"GET /half HTTP/1.1\r\nHost: x\r\n\r\n")
                c.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := c.recv(4096):
                    got += chunk
            assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"/half"), got
