"""One structlog line per request: method, path, status, duration, the key's name.

Written by a plain ASGI middleware (uvicorn's own access log is off). It never writes a
header, a query string or a body, so no key or address reaches the log.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import structlog

from worker.actions.web import loggable_path

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]

__all__ = ["AccessLog"]

_log = structlog.get_logger("mailworker.api")


class AccessLog:
    """Logs ``api_request_handled`` for each request; outermost, so 404s are too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(
        self, scope: MutableMapping[str, Any], receive: Receive, send: Send
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        # Read now: a mount rewrites the scope's path for the app it hands it to.
        path = loggable_path(scope["path"])[:200]
        status = 500
        state = scope.setdefault("state", {})

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            _log.info(
                "api_request_handled",
                method=scope["method"],
                path=path,
                status=status,
                duration_ms=round((time.perf_counter() - start) * 1000, 2),
                api_key=state.get("api_key") if isinstance(state, dict) else None,
            )
