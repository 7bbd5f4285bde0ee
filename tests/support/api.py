"""The HTTP API served for real by uvicorn on a free loopback port, in a thread."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis
import uvicorn

from common.sockets import free_port
from settings import Settings
from tests.support.env import HOST
from worker.api.accesslog import AccessLog
from worker.api.app import create_app
from worker.api.keys import ApiKeys
from worker.api.server import ServerOptions, uvicorn_options


@dataclass
class ApiServer:
    """``mailworker api``'s app and uvicorn options, on 127.0.0.1:PORT."""

    settings: Settings
    client: redis.Redis
    port: int = field(default_factory=free_port)
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> ApiServer:
        options = uvicorn_options(
            self.settings, ServerOptions(host=HOST, port=self.port)
        )
        app = AccessLog(create_app(self.settings, client=self.client))
        self._server = uvicorn.Server(uvicorn.Config(app, **options))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the API server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)

    def key(self, *scopes: str, name: str | None = None) -> str:
        """A new API key's secret with ``scopes``."""
        keys = ApiKeys(self.client, self.settings.namespace)
        _, secret = keys.create(
            name or f"k-{'-'.join(scopes)}-{time.monotonic_ns()}", scopes
        )
        return secret

    def http(self, secret: str | None = None, **options: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10, **options)
