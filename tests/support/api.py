"""The HTTP API served for real by uvicorn on a free loopback port, in a thread."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis

from common.sockets import free_port
from settings import Settings
from tests.support.env import HOST
from worker.api.accesslog import AccessLog
from worker.api.app import create_app
from worker.api.keys import ApiKeys
from worker.api.server import BackgroundServer


@dataclass
class ApiServer:
    """``mailworker api``'s app and uvicorn options, on 127.0.0.1:PORT."""

    settings: Settings
    client: redis.Redis
    port: int = field(default_factory=free_port)
    mount: bool = True
    _server: BackgroundServer | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.api.tls_certificate_file else "http"
        return f"{scheme}://{HOST}:{self.port}"

    def start(self) -> ApiServer:
        app = AccessLog(create_app(self.settings, client=self.client, mount=self.mount))
        self._server = BackgroundServer(app, self.settings, HOST, self.port)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()

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
