"""Who may call a route: ``Authorization: Bearer <key>``, the key's scopes, its rate.

No key or an unknown one is 401 and a key without the route's scope 403; neither says
which keys exist. A key's record is remembered for one second per process, so a busy
key costs no Redis round trip of its own, and a revoked key stops working within a
second. Then the key's rate limit (``worker.api.ratelimit``) is 429 with Retry-After.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, cast

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from worker.api.context import ApiContext
from worker.api.keys import ApiKey
from worker.api.problems import problem

__all__ = ["CACHE_SECONDS", "KeyCache", "scoped"]

CACHE_SECONDS = 1.0
_CACHE_SIZE = 4096
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="mailworker"'}


class KeyCache:
    """Keys found by their secret, remembered for ``CACHE_SECONDS`` (misses too).

    The cache holds the secret's SHA-256, never the secret.
    """

    def __init__(self) -> None:
        self._found: dict[bytes, tuple[ApiKey | None, float]] = {}

    def authenticate(self, context: ApiContext, secret: str) -> ApiKey | None:
        """The key of ``secret``, from the cache or ``ApiKeys.authenticate``."""
        digest = hashlib.sha256(secret.encode()).digest()
        now = time.monotonic()
        hit = self._found.get(digest)
        if hit is not None and now < hit[1]:
            return hit[0]
        key = context.keys.authenticate(secret)
        if len(self._found) >= _CACHE_SIZE:
            self._found.clear()  # a flood of made-up keys cannot grow it without bound
        self._found[digest] = (key, now + CACHE_SECONDS)
        return key


def _bearer(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization")
    if not header:
        return None
    kind, _, secret = header.partition(" ")
    return secret.strip() if kind.lower() == "bearer" and secret.strip() else None


async def scoped(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """A Litestar guard: the caller's key must carry the handler's ``opt["scope"]``.

    A coroutine, because Litestar runs a plain function guard in a thread; its Redis
    calls (the key when not cached, a rate lease when spent) take well under a ms.

    It is a coroutine because Litestar runs a plain function guard in a thread; the two
    Redis calls it may make take well under a millisecond.

    Raises:
        ProblemDetailsException: 401, 403 or 429.
    """
    context: ApiContext = connection.app.state.api
    cache: KeyCache = connection.app.state.key_cache
    secret = _bearer(connection)
    key = cache.authenticate(context, secret) if secret else None
    if key is None:
        raise problem(
            401,
            "give a valid API key as 'Authorization: Bearer <key>'",
            headers=_CHALLENGE,
        )
    scope = str(handler.opt["scope"])
    if not key.allows(scope):
        raise problem(403, f"this route needs an API key with the scope {scope!r}")
    allowed, retry_after = context.limiter.allow(key.name)
    if not allowed:
        raise problem(
            429,
            f"rate limit of this key exceeded ([api] rate_limit "
            f"{context.settings.api.rate_limit}); retry after {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )
    # For the access log line (worker.api.accesslog reads the same scope).
    cast("dict[str, Any]", connection.scope).setdefault("state", {})["api_key"] = (
        key.name
    )
