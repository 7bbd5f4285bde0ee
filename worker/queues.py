"""Queue depth for people and autoscalers: ``mailworker queue stats``."""

from __future__ import annotations

from typing import Any

import redis

from common.keys import QUEUES, dead_index_key

__all__ = ["queue_stats"]


def queue_stats(client: redis.Redis, namespace: str) -> dict[str, Any]:
    """Per priority: ``ready`` (waiting to be fetched), ``in_flight`` (fetched, not yet
    acknowledged), ``delayed`` (retries and waits not yet due); and ``dead`` overall.
    Counts are broker messages: a bulk message (``enqueue_many``) carries up to 20 jobs.
    One round trip."""
    with client.pipeline(transaction=False) as pipe:
        for queue in QUEUES.values():
            pipe.llen(f"{namespace}:{queue}")
            pipe.hlen(f"{namespace}:{queue}.msgs")
            pipe.hlen(f"{namespace}:{queue}.DQ.msgs")
        pipe.zcard(dead_index_key(namespace))
        replies = pipe.execute()
    stats: dict[str, Any] = {"queues": {}}
    total = 0
    for index, (priority, queue) in enumerate(QUEUES.items()):
        ready, stored, delayed = replies[3 * index : 3 * index + 3]
        stats["queues"][priority] = {
            "queue": queue,
            "ready": ready,
            "in_flight": max(0, stored - ready),
            "delayed": delayed,
        }
        total += ready
    stats["ready_total"] = total
    stats["dead"] = replies[-1]
    return stats
