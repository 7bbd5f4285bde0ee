"""Reading the outcome events the workers write (``{namespace}:events``, a Redis stream).

A consumer group is made on first use, from the stream's start, so a new engine
reads every event the stream still holds. Events stay pending for their consumer
until acknowledged (``ack_events``); a consumer that restarts reads its own pending
ones again with ``pending=True``.
"""

from __future__ import annotations

from typing import Any, cast

import orjson
import redis

from common.broker import broker_error
from common.keys import events_key

__all__ = ["Event", "ack_events", "read_events"]

# One event: type, id, job_id, at, data (decoded), and stream_id (what ack_events takes).
Event = dict[str, Any]


def read_events(
    client: redis.Redis,
    namespace: str,
    group: str,
    consumer: str,
    *,
    count: int = 100,
    block_ms: int = 0,
    pending: bool = False,
    label: str = "redis",
) -> list[Event]:
    """Up to ``count`` events for ``consumer`` of ``group``, oldest first.

    Args:
        client: the broker's Redis client.
        namespace: the key namespace.
        group: the consumer group (one per engine); made on first use.
        consumer: this reader's name within the group.
        count: the most events to return.
        block_ms: how long to wait for a new event when there is none (0: do not wait).
        pending: read this consumer's events not yet acknowledged instead of new ones.
        label: the broker URL with its password masked, for errors.

    Raises:
        BrokerUnavailableError: the broker cannot be reached or refuses.
    """
    key = events_key(namespace)
    try:
        _ensure_group(client, key, group)
        options: dict[str, Any] = {"count": max(1, count)}
        if block_ms > 0 and not pending:
            options["block"] = block_ms
        replies = cast(
            "list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None",
            client.xreadgroup(
                group, consumer, {key: "0" if pending else ">"}, **options
            ),
        )
    except redis.RedisError as exc:
        raise broker_error(label, exc) from None
    events = []
    for _stream, entries in replies or []:
        for stream_id, fields in entries:
            if fields:
                events.append(_event(stream_id, fields))
    return events


def ack_events(
    client: redis.Redis,
    namespace: str,
    group: str,
    stream_ids: list[str],
    *,
    label: str = "redis",
) -> int:
    """Acknowledge events ``group`` has handled; return how many were pending.

    Raises:
        BrokerUnavailableError: the broker cannot be reached or refuses.
    """
    if not stream_ids:
        return 0
    try:
        return int(client.xack(events_key(namespace), group, *stream_ids))
    except redis.RedisError as exc:
        raise broker_error(label, exc) from None


def _ensure_group(client: redis.Redis, key: str, group: str) -> None:
    try:
        client.xgroup_create(key, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _event(stream_id: bytes | str, fields: dict[Any, Any]) -> Event:
    text = {_text(k): _text(v) for k, v in fields.items()}
    try:
        data = orjson.loads(text.get("data") or "null")
    except orjson.JSONDecodeError:
        data = text.get("data")
    return {
        "stream_id": _text(stream_id),
        "type": text.get("type", ""),
        "id": text.get("id", ""),
        "job_id": text.get("job_id", ""),
        "at": text.get("at", ""),
        "data": data,
    }


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
