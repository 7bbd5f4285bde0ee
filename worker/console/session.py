"""Console sessions: a signed cookie naming a record in Redis that expires.

The cookie holds a random id and its HMAC under the console's secret, so a forged or
altered cookie is refused before Redis is asked. Redis keeps the session under the id's
SHA-256 (reading Redis never yields a live cookie) for ``[api] session_ttl``, counted
from the login: an absolute lifetime, not a sliding one. The record names the API key
and when that key was created; each request checks the key still exists with the
``ops`` scope, so a revoked key (or one revoked and created anew under its name) ends
its sessions at their next request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

import orjson
import redis

from worker.api.keys import ApiKey, ApiKeys
from worker.clock import iso_millis

__all__ = ["COOKIE", "ConsoleSession", "ConsoleSessions", "console_secret"]

COOKIE = "mailworker_ops"
_MAX_COOKIE = (
    256  # an id and a signature are 87 characters; anything far longer is not one
)


def console_secret(client: redis.Redis, namespace: str) -> bytes:
    """The secret that signs cookies and CSRF tokens, shared by every API process.

    It is made once per namespace (``SET NX``) and kept in Redis, so processes behind
    one address accept each other's cookies. Deleting the key ends every session and
    form at the next restart.
    """
    key = f"{namespace}:console:secret"
    client.set(key, secrets.token_hex(32), nx=True)
    value = client.get(key)
    assert value is not None  # just set, never expires
    return value if isinstance(value, bytes) else str(value).encode()


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    """A logged-in person: the key they logged in with."""

    key_name: str
    created_at: str


class ConsoleSessions:
    """Opens, finds and ends console sessions.

    Args:
        client: a Redis client.
        namespace: the configured namespace.
        secret: ``console_secret``'s value.
        ttl: seconds a session lives (``[api] session_ttl``).
    """

    def __init__(
        self, client: redis.Redis, namespace: str, *, secret: bytes, ttl: float
    ) -> None:
        self._client = client
        self._ns = namespace
        self._secret = hmac.new(secret, b"console session", hashlib.sha256).digest()
        self.ttl = max(1, int(ttl))
        self.keys = ApiKeys(client, namespace)

    def _key(self, session_id: str) -> str:
        digest = hashlib.sha256(session_id.encode()).hexdigest()
        return f"{self._ns}:console:session:{digest}"

    def _sign(self, session_id: str) -> str:
        mac = hmac.new(self._secret, session_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def open(self, key: ApiKey) -> str:
        """A new session for ``key``; returns the cookie's value."""
        session_id = secrets.token_urlsafe(32)
        record = {"key": key.name, "key_created_at": key.created_at, "at": iso_millis()}
        self._client.set(self._key(session_id), orjson.dumps(record), ex=self.ttl)
        return f"{session_id}.{self._sign(session_id)}"

    def _id(self, cookie: str | None) -> str | None:
        """The session id of a well-signed cookie, else None."""
        if not cookie or len(cookie) > _MAX_COOKIE or cookie.count(".") != 1:
            return None
        session_id, signature = cookie.split(".")
        if not hmac.compare_digest(signature, self._sign(session_id)):
            return None
        return session_id

    def find(self, cookie: str | None) -> ConsoleSession | None:
        """The live session of a cookie, or None (forged, expired, ended, key revoked).

        A session whose key is gone or lost the ``ops`` scope is deleted here.
        """
        session_id = self._id(cookie)
        if session_id is None:
            return None
        raw = self._client.get(self._key(session_id))
        if raw is None:
            return None
        record = orjson.loads(raw)
        key = next((k for k in self.keys.list() if k.name == record["key"]), None)
        live = key is not None and key.created_at == record["key_created_at"]
        if key is None or not live or not key.allows("ops"):
            self._client.delete(self._key(session_id))
            return None
        return ConsoleSession(key_name=key.name, created_at=record["at"])

    def close(self, cookie: str | None) -> bool:
        """End the cookie's session in Redis; False when there was none."""
        session_id = self._id(cookie)
        return bool(session_id and self._client.delete(self._key(session_id)))
