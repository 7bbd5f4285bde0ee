"""Webhook deliveries as dead letters: their record, their payload, and requeue.

A delivery that ran out of attempts is kept with the job dead letters (``{ns}:dead``,
``{ns}:dead:{id}`` and a status record under ``{ns}:job:{id}``) with the reason
``webhook``, so ``mailworker dead`` lists, shows, requeues and purges one list. Its id is
``webhook:NAME:EVENT_ID``. Its payload is the event and the webhook's name: no secret.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any, cast

import orjson
import redis
from redis.typing import EncodableT

from common.keys import dead_index_key, dead_payload_key, history_key, status_key
from worker.clock import iso_millis
from worker.events import scripts
from worker.events.model import (
    Delivery,
    body_of,
    dead_id,
    deliveries_key,
    parse_dead_id,
    retry_key,
)

__all__ = ["REASON", "error_record", "letter_fields", "letter_payload", "requeue"]

REASON = "webhook"  # the dead letters' reason


def error_record(webhook: str, code: int | None, message: str) -> dict[str, Any]:
    """The ``error`` of a webhook delivery's record (as a job's: type, code, service)."""
    return {"type": REASON, "code": code, "service": webhook, "message": message}


def letter_payload(webhook: str, delivery: Delivery) -> bytes:
    """What the dead letter keeps: the webhook's name and the event as it is POSTed."""
    event = delivery["event"]
    return orjson.dumps(
        {
            "webhook": webhook,
            "stream_id": event.get("stream_id"),
            "event": orjson.loads(body_of(event)),
        }
    )


def letter_fields(
    webhook: str, delivery: Delivery, attempts: int, error: dict[str, Any]
) -> dict[str, Any]:
    """The status record of a webhook delivery that is now a dead letter."""
    event = delivery["event"]
    now = iso_millis()
    return {
        "id": dead_id(webhook, event["id"]),
        "state": "dead",
        "reason": REASON,
        "service": "",
        "attempts": attempts,
        "error": error,
        "created_at": event.get("at") or now,
        "updated_at": now,
        "dead_at": now,
        "next_attempt_at": "",
        "metadata": {
            "webhook": webhook,
            "event_id": event["id"],
            "event_type": event.get("type"),
            "job_id": event.get("job_id"),
        },
    }


def requeue(
    client: redis.Redis,
    namespace: str,
    letter: str,
    *,
    ttl: float,
    webhooks: Collection[str] | None = None,
) -> str | None:
    """Put a webhook dead letter back on its webhook's retry schedule, due now.

    It is delivered again to that webhook only, with a fresh count of attempts.

    Args:
        client: a Redis client (bytes replies).
        namespace: the key prefix.
        letter: the dead letter's id (``webhook:NAME:EVENT_ID``).
        ttl: seconds its record is kept (``status.ttl``).
        webhooks: the enabled webhooks' names; None does not check.

    Returns:
        None once requeued, else why it was refused.
    """
    parsed = parse_dead_id(letter)
    payload = cast("bytes | None", client.get(dead_payload_key(namespace, letter)))
    if parsed is None or payload is None:
        return f"no dead letter {letter}"
    webhook, event_id = parsed
    if webhooks is not None and webhook not in webhooks:
        return f"{letter}: webhook {webhook} is not enabled in this configuration"
    kept = orjson.loads(payload)
    event = {**kept["event"], "stream_id": kept.get("stream_id") or ""}
    delivery = {"event": event, "attempts": 0, "failures": []}
    delivery |= {"scheduled": True, "requeued": True}
    fields = {
        "state": "queued",
        "reason": "",
        "error": "",
        "dead_at": "",
        "next_attempt_at": "",
        "attempts": "0",
        "updated_at": iso_millis(),
    }
    keys = [
        dead_index_key(namespace),
        dead_payload_key(namespace, letter),
        status_key(namespace, letter),
        history_key(namespace, letter),
        retry_key(namespace, webhook),
        deliveries_key(namespace, webhook),
    ]
    args: list[EncodableT] = [
        letter,
        event_id,
        orjson.dumps(delivery),
        int(time.time() * 1000),
        int(ttl),
        orjson.dumps(fields).decode(),
        orjson.dumps({"at": fields["updated_at"], "event": "requeued"}),
    ]
    if not client.register_script(scripts.REQUEUE)(keys=keys, args=args):
        return f"no dead letter {letter}"
    return None
