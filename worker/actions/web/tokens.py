"""The form token of an action page: an HMAC over key, action and expiry.

There is no login: the key in the path is the only proof, and whoever holds it can
act as its recipient. So a cross-site request forgery here is a POST that nobody chose
on our own page: a scanner or a form elsewhere that replays a link as a POST. The page's
token proves the POST came from a page we served for this very key and action, within
``TOKEN_TTL``; the handler also refuses a POST that the browser marks as cross-site
(``Sec-Fetch-Site``) or from another ``Origin``.

The HMAC key is 32 random bytes kept in Redis (made by the first page served), so every
``mailworker api`` process on the broker checks the others' tokens. Deleting it voids
every open page's token (they show "open the link again").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

import redis

__all__ = ["TOKEN_TTL", "FormTokens"]

TOKEN_TTL = 4 * 3600  # seconds: a page left open over lunch still works
_CONTEXT = b"mailworker action link v1"


class FormTokens:
    """Issues and checks the tokens of action pages.

    Args:
        client: the broker's Redis.
        namespace: the workers' namespace.
    """

    def __init__(self, client: redis.Redis, *, namespace: str) -> None:
        self._client = client
        # Only this module reads it; the name stays beside the other action keys.
        self._name = f"{namespace}:action-links:secret"
        self._secret: bytes | None = None

    def _key(self) -> bytes:
        """The HMAC key: read once, made by whichever process comes first.

        Raises:
            redis.RedisError: Redis did not answer.
        """
        if self._secret is None:
            with self._client.pipeline(transaction=True) as pipe:
                pipe.set(self._name, secrets.token_hex(32), nx=True)
                pipe.get(self._name)
                _, value = pipe.execute()
            self._secret = bytes.fromhex(value.decode())
        return self._secret

    def _mac(self, key: str, action: str, expires: int) -> str:
        message = b"\0".join([_CONTEXT, key.encode(), action.encode(), b"%d" % expires])
        digest = hmac.new(self._key(), message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def issue(self, key: str, action: str, *, now: float | None = None) -> str:
        """A token for the page of ``key`` and ``action``: ``<expiry>.<mac>``.

        Raises:
            redis.RedisError: Redis did not answer.
        """
        expires = int(now if now is not None else time.time()) + TOKEN_TTL
        return f"{expires}.{self._mac(key, action, expires)}"

    def valid(
        self, token: str, key: str, action: str, *, now: float | None = None
    ) -> bool:
        """True when ``token`` was issued for ``key`` and ``action`` and is not stale.

        Raises:
            redis.RedisError: Redis did not answer.
        """
        stamp, _, mac = token.partition(".")
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12 and mac):
            return False
        expires = int(stamp)
        if expires < (now if now is not None else time.time()):
            return False
        return hmac.compare_digest(
            mac.encode(), self._mac(key, action, expires).encode()
        )
