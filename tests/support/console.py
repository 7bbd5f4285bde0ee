"""The /ops/ console served for tests: uvicorn on a free loopback port, the console
mounted at /ops in an outer Litestar app as ``mailworker api`` mounts it (a plain
``@asgi(is_mount=True)`` handler, the scope not copied), and a visitor
that keeps cookies as a browser does on http://127.0.0.1 (Secure ones included)."""

from __future__ import annotations

import html
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import redis
import uvicorn
from litestar import Litestar, asgi
from litestar.types import Receive, Scope, Send

from common.sockets import free_port
from settings import Settings
from tests.support.env import HOST
from worker.console import create_console_app

TOKEN = re.compile(r'name="_csrf_token" value="([^"]+)"')


@contextmanager
def serve_console(
    settings: Settings, client: redis.Redis, *, proxied_under: str | None = None
) -> Iterator[str]:
    """Serve the console; yields its base URL (``http://127.0.0.1:PORT/ops``).

    With ``proxied_under``, the console alone is served as behind a proxy that strips
    that prefix (``uvicorn --root-path``), and the URL has no prefix.
    """
    console = create_console_app(settings, client)
    app: Any = console
    if proxied_under is None:

        @asgi("/ops", is_mount=True, copy_scope=True)  # as `mailworker api` mounts it
        async def mounted(scope: Scope, receive: Receive, send: Send) -> None:
            await console(scope, receive, send)

        app = Litestar(route_handlers=[mounted])
    port = free_port()
    config = uvicorn.Config(
        app,
        host=HOST,
        port=port,
        log_level="warning",
        lifespan="off",
        root_path=proxied_under or "",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, (
            "uvicorn did not start"
        )
        time.sleep(0.02)
    try:
        yield f"http://{HOST}:{port}" + ("/ops" if proxied_under is None else "")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class Visitor:
    """An HTTP client that keeps the console's cookies by hand.

    httpx (http.cookiejar) never sends a Secure cookie over plain http; browsers do on
    127.0.0.1 and localhost, which is what this imitates.
    """

    def __init__(self, base: str) -> None:
        self.base = base
        self.cookies: dict[str, str] = {}
        self.http = httpx.Client(follow_redirects=False, timeout=10)
        self.token = ""

    def close(self) -> None:
        self.http.close()

    def _keep(self, response: httpx.Response) -> httpx.Response:
        for header in response.headers.get_list("set-cookie"):
            name, _, rest = header.partition("=")
            value = rest.split(";", 1)[0]
            if "Max-Age=0" in header or not value:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        found = TOKEN.search(response.text)
        if found:
            self.token = html.unescape(found.group(1))
        return response

    def _headers(self) -> dict[str, str]:
        jar = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        return {"cookie": jar} if jar else {}

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self._keep(
            self.http.get(self.base + path, params=params, headers=self._headers())
        )

    def post(
        self, path: str, data: dict[str, str] | None = None, *, token: bool = True
    ) -> httpx.Response:
        """POST a form, with the page's CSRF token unless ``token`` is False."""
        form = dict(data or {})
        if token:
            form.setdefault("_csrf_token", self.token)
        return self._keep(
            self.http.post(self.base + path, data=form, headers=self._headers())
        )

    def login(self, secret: str) -> httpx.Response:
        self.get("/login")
        return self.post("/login", {"key": secret})
