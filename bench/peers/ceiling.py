"""1. Ceiling: a no-op Dramatiq actor; what the queue alone allows (no mail is sent)."""

from __future__ import annotations

import dramatiq

from bench.peers._dramatiq import QUEUE, broker


@dramatiq.actor(queue_name=QUEUE, actor_name="noop", max_retries=0)
def noop(**_job: object) -> None:
    """Do nothing with the job."""


__all__ = ["broker", "noop"]
