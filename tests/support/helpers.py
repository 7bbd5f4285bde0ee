"""Small helpers shared by tests (no fixtures here)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any


def wire_enqueue(
    client: Any,
    namespace: str,
    job: Any,
    *,
    queue: str = "mail",
    actor: str = "deliver",
    kwargs: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    wake: bool = False,
    job_id: str | None = None,
) -> str:
    """Enqueue the way the README tells non-Python producers to: plain Redis commands
    (``options``: Dramatiq message options beside the required redis message id; with
    ``wake``, also its ``PUBLISH`` of the queue's name to idle workers)."""
    redis_message_id, job_id = str(uuid.uuid4()), job_id or str(uuid.uuid4())
    payload = json.dumps(
        {
            "queue_name": queue,
            "actor_name": actor,
            "args": [],
            "kwargs": {"job": job} if kwargs is None else kwargs,
            "options": {"redis_message_id": redis_message_id, **(options or {})},
            "message_id": job_id,
            "message_timestamp": int(time.time() * 1000),
        }
    )
    with client.pipeline(transaction=True) as pipe:  # MULTI/EXEC, hash first
        pipe.hset(f"{namespace}:{queue}.msgs", redis_message_id, payload)
        pipe.rpush(f"{namespace}:{queue}", redis_message_id)
        if wake:
            pipe.publish(f"{namespace}:wake", queue)
        pipe.execute()
    return job_id


def wait_for(predicate: Any, *, timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
