"""An ASGI app served for real by uvicorn on a free loopback port, in a thread."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

from tests.support.env import HOST


class UvicornServer:
    """Binds a port the kernel picks on ``HOST`` now; ``start(app)`` serves ``app`` there.

    The socket is bound first and handed to uvicorn, so the URL is known before the app
    is built (it may need it) and there is no race for the port. No access log: it
    would print the paths, and the action links' paths hold keys.
    """

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind((HOST, 0))
        self.port = self._sock.getsockname()[1]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, app: Any) -> UvicornServer:
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="on", loop="asyncio"
        )
        server = self._server = uvicorn.Server(config)
        thread = self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
        self._sock.close()
