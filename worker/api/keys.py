"""API keys: a name, scopes, and a secret shown once and kept only as its hash.

A secret is ``mwk_`` and 32 random bytes (URL-safe base64): with that much entropy a
plain SHA-256 is as good as a slow hash, and lets a request find its key in one
``HGET`` by the hash, so the secret is never compared byte by byte. Two hashes hold the
same record: by name (for list and revoke) and by hash (for authentication); a script
writes and deletes both together, so neither can name a key the other lacks.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

import orjson
import redis

from common.keys import api_key_hashes_key, api_keys_key
from worker.clock import iso_millis

__all__ = ["SCOPES", "ApiKey", "ApiKeyError", "ApiKeys", "parse_scopes"]

SCOPES = ("send", "read", "ops")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PREFIX = "mwk_"
# A secret is PREFIX + 43 base64url characters; anything far longer is not one.
_MAX_SECRET = 128

_CREATE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""

_REVOKE = """
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], cjson.decode(record)['hash'])
return 1
"""


class ApiKeyError(ValueError):
    """A key's name or scopes are not acceptable; the message names the field."""


@dataclass(frozen=True)
class ApiKey:
    """A key as it is listed and as a request sees it (never its secret)."""

    name: str
    scopes: frozenset[str]
    created_at: str

    def allows(self, scope: str) -> bool:
        """Whether the key carries ``scope``."""
        return scope in self.scopes


def parse_scopes(value: str | Iterable[str]) -> frozenset[str]:
    """Scopes from ``"send,read"`` or an iterable; an unknown or empty one is an error."""
    items = value.split(",") if isinstance(value, str) else list(value)
    scopes = frozenset(s.strip() for s in items if s.strip())
    unknown = sorted(scopes - set(SCOPES))
    if unknown:
        raise ApiKeyError(
            f"scopes: {', '.join(map(repr, unknown))} is not one of {', '.join(SCOPES)}"
        )
    if not scopes:
        raise ApiKeyError(f"scopes: give at least one of {', '.join(SCOPES)}")
    return scopes


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _key(record: bytes | str) -> ApiKey:
    data = orjson.loads(record)
    return ApiKey(
        name=data["name"],
        scopes=frozenset(data["scopes"]),
        created_at=data["created_at"],
    )


class ApiKeys:
    """Reads and writes ``{namespace}:api:keys`` and ``{namespace}:api:key-hashes``.

    Args:
        client: a Redis client.
        namespace: the configured namespace.
    """

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self._client = client
        self._keys = (api_keys_key(namespace), api_key_hashes_key(namespace))
        self._create = client.register_script(_CREATE)
        self._revoke = client.register_script(_REVOKE)

    def create(self, name: str, scopes: Iterable[str]) -> tuple[ApiKey, str]:
        """A new key named ``name``; returns it and its secret, which is kept nowhere.

        Raises:
            ApiKeyError: the name is malformed or taken, or the scopes are wrong.
        """
        if not NAME.match(name):
            raise ApiKeyError(
                f"name: {name!r} is not a key name: 1-64 of A-Z, a-z, 0-9, '_', '.', '-'"
            )
        chosen = parse_scopes(scopes)
        secret = PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(name=name, scopes=chosen, created_at=iso_millis())
        record = orjson.dumps(
            {
                "name": name,
                "scopes": sorted(chosen),
                "created_at": key.created_at,
                "hash": _digest(secret),
            }
        )
        if not self._create(keys=self._keys, args=[name, _digest(secret), record]):
            raise ApiKeyError(f"name: a key named {name!r} exists; revoke it first")
        return key, secret

    def list(self) -> list[ApiKey]:
        """Every key, by name."""
        records = self._client.hvals(self._keys[0])
        return sorted((_key(r) for r in records), key=lambda k: k.name)

    def revoke(self, name: str) -> bool:
        """Delete the key named ``name``; False when there was none."""
        return bool(self._revoke(keys=self._keys, args=[name]))

    def authenticate(self, secret: str) -> ApiKey | None:
        """The key whose secret this is, or None (a wrong, revoked or malformed one)."""
        if not secret.startswith(PREFIX) or len(secret) > _MAX_SECRET:
            return None
        record = self._client.hget(self._keys[1], _digest(secret))
        return None if record is None else _key(record)

    def __repr__(self) -> str:
        return f"ApiKeys({self._keys[0]!r})"
