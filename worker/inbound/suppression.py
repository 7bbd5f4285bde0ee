"""The suppression list: addresses later jobs do not send to, kept in one Redis hash."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypedDict

import orjson
import redis

from common.keys import suppressed_key
from worker.clock import iso_millis

__all__ = ["Suppressed", "SuppressionList", "normal"]


class Suppressed(TypedDict):
    """One entry: whom, why, because of which job, since when."""

    address: str
    reason: str
    job_id: str | None
    at: str


def normal(address: str) -> str:
    """The form an address is kept under: lowercased, spaces trimmed."""
    return address.strip().lower()


def entry(address: str, reason: str, job_id: str | None) -> Suppressed:
    """A new entry for ``address``, dated now."""
    return {"address": address, "reason": reason, "job_id": job_id, "at": iso_millis()}


class SuppressionList:
    """Reads and writes ``{namespace}:suppressed``.

    Args:
        client: a Redis client.
        namespace: the key prefix shared with producers.
    """

    def __init__(self, client: redis.Redis, *, namespace: str) -> None:
        self._client = client
        self.key = suppressed_key(namespace)

    def add(self, address: str, *, reason: str, job_id: str | None = None) -> bool:
        """Suppress ``address``; False when it already was (its entry is kept)."""
        value = orjson.dumps(entry(address, reason, job_id))
        return bool(self._client.hsetnx(self.key, normal(address), value))

    def remove(self, address: str) -> bool:
        """Take ``address`` off the list; False when it was not on it."""
        return bool(self._client.hdel(self.key, normal(address)))

    def check(self, addresses: Iterable[str]) -> dict[str, Suppressed]:
        """The entries of those of ``addresses`` that are suppressed, by address as given."""
        wanted = list(dict.fromkeys(addresses))
        if not wanted:
            return {}
        found = self._client.hmget(self.key, [normal(a) for a in wanted])
        return {
            address: orjson.loads(raw)
            for address, raw in zip(wanted, found, strict=True)
            if raw is not None
        }

    def entries(self) -> list[Suppressed]:
        """Every entry, newest first."""
        items = [orjson.loads(raw) for _, raw in self._client.hscan_iter(self.key)]
        return sorted(items, key=lambda e: e.get("at", ""), reverse=True)

    def size(self) -> int:
        """How many addresses are suppressed."""
        return int(self._client.hlen(self.key))
