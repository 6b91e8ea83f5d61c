"""`vitdeploy serve`'s app on a loopback port in a background thread, for the HTTP tests."""

from __future__ import annotations

import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``with Server(runtime, **create_app_options) as srv:`` serves on ``srv.url`` until the block ends."""

    def __init__(self, runtime, **kw):
        import uvicorn

        from vitdeploy.serving.server import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(runtime, **{"model_name": "m", **kw})
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error",
                                                    timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                break
            time.sleep(0.02)
        return self

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)

    def __exit__(self, *exc):
        self.stop()
        assert not self.thread.is_alive(), "the server thread did not stop"
