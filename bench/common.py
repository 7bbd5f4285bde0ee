"""What every part of the benchmark shares: the notification, the environment names,
and writing Dramatiq messages straight onto Redis (the wire format the README documents).

Imported by the worker processes of the peers too, so it imports nothing heavy.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

# The one notification every contender sends: one recipient, text + html, ~2.3 KB of body.
FROM_ADDRESS = "noreply@bench.example"
TO_ADDRESS = "ann.example@bench.example"
SUBJECT = "Task 4711 of workflow wf-7 is waiting for your approval"
TEXT = (
    "Hello Ann,\n\n"
    'task 4711 ("Approve purchase order PO-2026-0815") of workflow wf-7 is waiting for\n'
    "your approval since 09:14. Please open it in the workflow portal and approve or\n"
    "reject it before the deadline on Friday, 17:00.\n\n"
    "Requested by: Bob Example (Purchasing)\n"
    "Amount: EUR 12,480.00\n"
    "Supplier: Example Office Supplies Ltd.\n\n"
    "You receive this message because you are an approver of this workflow.\n"
    "-- \nThe workflow engine\n"
)
HTML = (
    '<!DOCTYPE html><html><head><meta charset="utf-8"><title>Approval needed</title>'
    '</head><body style="font-family: Arial, Helvetica, sans-serif; color: #222;">'
    "<p>Hello Ann,</p><p>task <b>4711</b> (&ldquo;Approve purchase order "
    "PO-2026-0815&rdquo;) of workflow <b>wf-7</b> is waiting for your approval since "
    '09:14. Please open it in the <a href="https://workflow.bench.example/tasks/4711">'
    "workflow portal</a> and approve or reject it before the deadline on "
    '<b>Friday, 17:00</b>.</p><table style="border-collapse: collapse;">'
    '<tr><td style="padding: 2px 8px;">Requested by</td><td style="padding: 2px 8px;">'
    'Bob Example (Purchasing)</td></tr><tr><td style="padding: 2px 8px;">Amount</td>'
    '<td style="padding: 2px 8px;">EUR 12,480.00</td></tr><tr><td style="padding: 2px '
    '8px;">Supplier</td><td style="padding: 2px 8px;">Example Office Supplies Ltd.</td>'
    '</tr></table><p><a href="https://workflow.bench.example/tasks/4711/approve" '
    'style="background: #0a7; color: #fff; padding: 6px 12px; text-decoration: none;">'
    'Approve</a> <a href="https://workflow.bench.example/tasks/4711/reject" '
    'style="background: #c33; color: #fff; padding: 6px 12px; text-decoration: none;">'
    'Reject</a></p><p style="color: #888; font-size: 12px;">You receive this message '
    "because you are an approver of this workflow.</p></body></html>"
)

# Environment of the peer worker processes.
ENV_REDIS_URL = "BENCH_REDIS_URL"
ENV_NAMESPACE = "BENCH_NAMESPACE"
ENV_QUEUE = "BENCH_QUEUE"
ENV_SMTP_HOST = "BENCH_SMTP_HOST"
ENV_SMTP_PORT = "BENCH_SMTP_PORT"


def env(name: str, default: str | None = None) -> str:
    """A ``BENCH_*`` variable; a missing one without default is an error naming it."""
    value = os.environ.get(name, default)
    if value is None:
        raise RuntimeError(f"{name} is not set (the benchmark harness sets it)")
    return value


def peer_kwargs(ref: str) -> dict[str, Any]:
    """The job a peer actor or task receives: the same notification, ``ref`` its id."""
    return {
        "to": TO_ADDRESS,
        "subject": SUBJECT,
        "text": TEXT,
        "html": HTML,
        "ref": ref,
    }


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def dramatiq_enqueue(
    client: Any,
    namespace: str,
    queue: str,
    actor_name: str,
    jobs: Iterable[dict[str, Any]],
    *,
    ids: list[str] | None = None,
) -> list[str]:
    """Put Dramatiq messages for ``actor_name`` on ``queue``: HSET + RPUSH, pipelined.

    This is what ``RedisBroker.enqueue`` does (its Lua ``enqueue`` command), minus one
    round trip per message. ``ids`` are the Dramatiq message ids (fresh uuid4s if None).

    Returns:
        The message ids, in order.
    """
    batch = list(jobs)
    message_ids = ids or [str(uuid.uuid4()) for _ in batch]
    queue_key, msgs_key = f"{namespace}:{queue}", f"{namespace}:{queue}.msgs"
    now_ms = int(time.time() * 1000)
    pairs = list(zip(message_ids, batch, strict=True))
    for chunk in _chunks(pairs, 500):
        with client.pipeline(transaction=False) as pipe:
            for message_id, kwargs in chunk:
                redis_id = str(uuid.uuid4())
                payload = {
                    "queue_name": queue,
                    "actor_name": actor_name,
                    "args": [],
                    "kwargs": kwargs,
                    "options": {"redis_message_id": redis_id},
                    "message_id": message_id,
                    "message_timestamp": now_ms,
                }
                pipe.hset(
                    msgs_key, redis_id, json.dumps(payload, separators=(",", ":"))
                )
                pipe.rpush(queue_key, redis_id)
            pipe.execute()
    return message_ids


def delete_prefix(client: Any, prefix: str) -> int:
    """UNLINK every key starting with ``prefix`` (SCAN, never FLUSHDB); returns the count."""
    removed = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}*", count=2000):
        batch.append(key)
        if len(batch) >= 1000:
            removed += client.unlink(*batch)
            batch = []
    if batch:
        removed += client.unlink(*batch)
    return removed
