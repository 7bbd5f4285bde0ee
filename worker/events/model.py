"""Names and shapes of webhook deliveries: the event as POSTed, dead-letter ids, keys."""

from __future__ import annotations

from typing import Any

import orjson

__all__ = [
    "BODY_FIELDS",
    "DEAD_PREFIX",
    "Delivery",
    "Event",
    "body_of",
    "dead_id",
    "deliveries_key",
    "event_of",
    "group_name",
    "parse_dead_id",
    "retry_key",
    "text",
]

# The event's fields a POST carries, in this order (docs/design.md §9).
BODY_FIELDS = ("id", "type", "job_id", "at", "data")
DEAD_PREFIX = "webhook:"  # a webhook dead letter's id starts so (``dead_id``)
# One event: stream_id, id, type, job_id, at, data (decoded).
Event = dict[str, Any]
# A delivery waiting for a retry: event, attempts, failures, requeued.
Delivery = dict[str, Any]


def body_of(event: Event) -> bytes:
    """The JSON body of an event's POST: its fields, ``data`` decoded, compact."""
    return orjson.dumps({name: event.get(name) for name in BODY_FIELDS})


def dead_id(webhook: str, event_id: str) -> str:
    """The id of a webhook delivery's dead letter: ``webhook:NAME:EVENT_ID``.

    A job id cannot hold a colon, so no job's dead letter ever has such an id.
    """
    return f"{DEAD_PREFIX}{webhook}:{event_id}"


def parse_dead_id(letter: str) -> tuple[str, str] | None:
    """(webhook, event id) of a webhook dead letter's id, or None for any other id."""
    if not letter.startswith(DEAD_PREFIX):
        return None
    webhook, sep, event_id = letter[len(DEAD_PREFIX) :].partition(":")
    return (webhook, event_id) if sep and webhook and event_id else None


def group_name(webhook: str) -> str:
    """The consumer group of one webhook on the events stream."""
    return f"mailworker-webhook-{webhook}"


def retry_key(namespace: str, webhook: str) -> str:
    """The sorted set of a webhook's deliveries waiting for a retry: id → due (ms)."""
    return f"{namespace}:webhook:{webhook}:retry"


def deliveries_key(namespace: str, webhook: str) -> str:
    """The hash of a webhook's deliveries waiting for a retry: id → delivery (JSON)."""
    return f"{namespace}:webhook:{webhook}:deliveries"


def event_of(stream_id: bytes, fields: dict[bytes, bytes]) -> Event:
    """An entry of the events stream as a dict, ``data`` decoded."""
    named = {text(k): text(v) for k, v in fields.items()}
    try:
        data = orjson.loads(named.get("data") or "null")
    except orjson.JSONDecodeError:
        data = named.get("data")
    return {
        "stream_id": text(stream_id),
        "id": named.get("id", ""),
        "type": named.get("type", ""),
        "job_id": named.get("job_id", ""),
        "at": named.get("at", ""),
        "data": data,
    }


def text(value: bytes | str) -> str:
    """A Redis reply as text."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
