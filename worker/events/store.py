"""A webhook's deliveries in Redis: its consumer group, the retry schedule, dead letters.

Per webhook NAME, on top of the events stream ``{ns}:events``:

- the consumer group ``mailworker-webhook-NAME``, shared by every worker process, so each
  event goes to one of them; an entry stays pending until its first attempt's outcome;
- ``{ns}:webhook:NAME:deliveries``: event id → the delivery waiting for a retry (the
  event, its attempts and failures), and ``{ns}:webhook:NAME:retry``: event id → when
  (ms) it is next due. A process that takes a due delivery moves its time on by the claim
  timeout, so one that dies holding it hands it on by itself.

Each move (stream → retry schedule → dead letter) is one Lua script, so a delivery is
always in exactly one place.
"""

from __future__ import annotations

import time
from typing import Any, cast

import orjson
import redis
from redis.typing import EncodableT

from common.keys import (
    dead_index_key,
    dead_payload_key,
    events_key,
    history_key,
    status_key,
)
from settings import StatusSettings
from worker.events import scripts
from worker.events.model import (
    Delivery,
    Event,
    dead_id,
    deliveries_key,
    event_of,
    group_name,
    retry_key,
    text,
)
from worker.status import DeadTrims

__all__ = ["DeliveryStore"]

_Entries = list[tuple[bytes, dict[bytes, bytes]]]


class DeliveryStore:
    """One webhook's deliveries: read, claimed, retried, finished or dead-lettered.

    Args:
        client: a Redis client (bytes replies).
        namespace: the key prefix shared with producers.
        webhook: the webhook's name.
        ttl: seconds a dead letter and its record are kept (``status.ttl``).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str,
        webhook: str,
        ttl: float,
        max_dead_letters: int = StatusSettings().max_dead_letters,
    ) -> None:
        self._client = client
        self._max_dead = max_dead_letters
        self._trims = DeadTrims(max_dead_letters)
        self._ns = namespace
        self.webhook = webhook
        self.group = group_name(webhook)
        self._ttl = int(ttl)
        self._stream = events_key(namespace)
        self._retry_key = retry_key(namespace, webhook)
        self._deliveries = deliveries_key(namespace, webhook)
        self._retry = client.register_script(scripts.RETRY)
        self._dead = client.register_script(scripts.DEAD)
        self._done = client.register_script(scripts.DONE)
        self._claim_due = client.register_script(scripts.CLAIM_DUE)

    def ensure_group(self) -> None:
        """Make the group if it is missing, at the stream's end ("$").

        A new webhook gets the events written from now on, not the stream's backlog.
        An existing group keeps its position.
        """
        try:
            self._client.xgroup_create(self._stream, self.group, id="$", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read_new(
        self, consumer: str, *, count: int, block_ms: int | None
    ) -> list[Event]:
        """Events no consumer of the group has had yet.

        With ``block_ms`` (at least 1), waits that long for one when there is none.
        """
        if block_ms is not None and block_ms < 1:
            block_ms = 1  # BLOCK 0 would wait for ever
        try:
            replies = cast(
                "list[tuple[bytes, _Entries]] | None",
                self._client.xreadgroup(
                    self.group,
                    consumer,
                    {self._stream: ">"},
                    count=count,
                    block=block_ms,
                ),
            )
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()  # the stream was deleted: start again at its end
            return []
        return [event_of(sid, f) for _, entries in replies or [] for sid, f in entries]

    def claim_stale(
        self, consumer: str, *, idle_ms: int, count: int
    ) -> tuple[list[Event], list[str]]:
        """Take over entries another consumer has held longer than ``idle_ms``.

        Returns:
            The claimed events, and the ids of entries trimmed off the stream meanwhile
            (Redis drops those from the pending list; they cannot be sent).
        """
        reply = self._client.xautoclaim(
            self._stream, self.group, consumer, idle_ms, "0-0", count=count
        )
        entries = cast("_Entries", reply[1])
        lost = [text(i) for i in reply[2]] if len(reply) > 2 else []
        return [event_of(sid, f) for sid, f in entries if f], lost

    def prune(self, *, idle_ms: int = 3_600_000) -> int:
        """Drop consumers that hold nothing and were idle over ``idle_ms``, and count them.

        Each worker process reads under a name of its own, so names of processes long
        gone would pile up in the group otherwise.
        """
        consumers = self._client.xinfo_consumers(self._stream, self.group)
        dropped = 0
        for consumer in consumers:
            if int(consumer["pending"]) == 0 and int(consumer["idle"]) > idle_ms:
                name = text(consumer["name"])
                self._client.xgroup_delconsumer(self._stream, self.group, name)
                dropped += 1
        return dropped

    def forget(self, consumer: str) -> None:
        """Drop this consumer from the group, unless it still holds an entry."""
        held = self._client.xpending_range(
            self._stream, self.group, "-", "+", 1, consumername=consumer
        )
        if not held:
            self._client.xgroup_delconsumer(self._stream, self.group, consumer)

    def claim_due(self, *, lease: float, count: int) -> list[Delivery]:
        """Deliveries whose retry is due, each held for ``lease`` seconds."""
        now = int(time.time() * 1000)
        raw = self._claim_due(
            keys=[self._retry_key, self._deliveries],
            args=[now, now + int(lease * 1000), count],
        )
        return [orjson.loads(item) for item in cast("list[bytes]", raw)]

    def ack(self, stream_ids: list[str]) -> None:
        """First attempts' events are done (delivered, or not of the webhook's types)."""
        if stream_ids:
            self._client.xack(self._stream, self.group, *stream_ids)

    def finish(
        self,
        delivery: Delivery,
        fields: dict[str, Any] | None = None,
        history: list[dict[str, Any]] | None = None,
    ) -> bool:
        """A retried delivery is done (False when another process finished it first)."""
        event_id = delivery["event"]["id"]
        keys = [self._retry_key, self._deliveries, *self._record_keys(event_id)]
        args: list[EncodableT] = [event_id, self._ttl, *_record_args(fields, history)]
        return bool(self._done(keys=keys, args=args))

    def schedule(
        self,
        delivery: Delivery,
        due: float,
        *,
        fields: dict[str, Any] | None = None,
        history: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Keep a failed delivery for a retry at ``due`` (Unix seconds).

        Returns:
            False when it was no longer this process's to keep (finished elsewhere).
        """
        event = delivery["event"]
        keys = [
            self._stream,
            self._retry_key,
            self._deliveries,
            *self._record_keys(event["id"]),
        ]
        args: list[EncodableT] = [
            self.group,
            "" if delivery.get("scheduled") else event["stream_id"],
            event["id"],
            orjson.dumps({**delivery, "scheduled": True}),
            int(due * 1000),
            self._ttl,
            *_record_args(fields, history),
        ]
        return bool(self._retry(keys=keys, args=args))

    def bury(
        self,
        delivery: Delivery,
        *,
        dead_id: str,
        payload: bytes,
        fields: dict[str, Any],
        history: list[dict[str, Any]],
    ) -> bool:
        """Make a delivery that ran out of attempts a dead letter, with its record."""
        event = delivery["event"]
        keys = [
            self._stream,
            self._retry_key,
            self._deliveries,
            status_key(self._ns, dead_id),
            history_key(self._ns, dead_id),
            dead_index_key(self._ns),
            dead_payload_key(self._ns, dead_id),
        ]
        args: list[EncodableT] = [
            self.group,
            "" if delivery.get("scheduled") else event["stream_id"],
            event["id"],
            dead_id,
            payload,
            int(time.time() * 1000),
            self._ttl,
            self._max_dead,
            *_record_args(fields, history),
        ]
        reply = self._dead(keys=keys, args=args)
        if not reply:
            return False
        if len(reply) > 1:
            self._trims.note(reply[1:])
        return True

    def _record_keys(self, event_id: str) -> list[str]:
        # Only a requeued delivery has a record; its id is the dead letter's.
        name = dead_id(self.webhook, event_id)
        return [status_key(self._ns, name), history_key(self._ns, name)]


def _record_args(
    fields: dict[str, Any] | None, history: list[dict[str, Any]] | None
) -> list[EncodableT]:
    """A record's fields as one JSON object of strings (as ``StatusStore`` writes them),
    then each history entry."""
    flat = {name: _field(value) for name, value in (fields or {}).items()}
    return [
        orjson.dumps(flat).decode() if flat else "",
        *(orjson.dumps(entry) for entry in history or []),
    ]


def _field(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return str(value)
