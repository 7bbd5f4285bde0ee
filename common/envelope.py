"""The Dramatiq message every job travels in: the documented wire format."""

from __future__ import annotations

import time
from typing import Any

__all__ = ["envelope"]


def envelope(
    job_id: str,
    queue: str,
    actor: str,
    kwargs: dict[str, Any],
    *,
    options: dict[str, Any] | None = None,
    timestamp_ms: int | None = None,
) -> dict[str, Any]:
    """The fields of a Dramatiq message for ``actor`` on ``queue``.

    Args:
        job_id: the message id (a single job's id).
        queue: the Dramatiq queue name.
        actor: the actor name (``ACTOR_NAME`` or ``BATCH_ACTOR_NAME``).
        kwargs: the actor's keyword arguments (``{"job": ...}`` or ``{"jobs": [...]}``).
        options: Dramatiq's options (``redis_message_id``, ``retries``, ...).
        timestamp_ms: when it was first enqueued, now when omitted.
    """
    return {
        "queue_name": queue,
        "actor_name": actor,
        "args": [],
        "kwargs": kwargs,
        "options": options if options is not None else {},
        "message_id": job_id,
        "message_timestamp": int(time.time() * 1000)
        if timestamp_ms is None
        else timestamp_ms,
    }
