"""Dramatiq's retry, but the delayed copy is enqueued with the acknowledgement.

The copy is enqueued inside Dramatiq's ack loop: if Redis is unreachable, the original
is not acknowledged, and the operation is tried again until it succeeds. Dramatiq's own
``Retries`` acknowledges and loses the message when that enqueue fails.
"""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq import Broker, Middleware
from dramatiq.broker import MessageProxy

from settings import RetryPolicy
from worker.broker.attached import attached

__all__ = ["ReliableRetries"]


class ReliableRetries(Middleware):
    """Retries a failed message, up to ``policy.max_attempts`` runs in all.

    The actor raises ``dramatiq.Retry`` with its own delay for every retry it wants. Any
    other exception (a bug, Redis gone mid-job) waits ``policy.backoff``, the actor's
    own rule. ``SafeConsumer.ack`` enqueues the delayed copy: one that waits longer
    than ``SCHEDULE_AFTER_MS`` goes into the scheduled set in the ack's own script.

    Args:
        policy: the ``[retry]`` settings.
    """

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.max_attempts = policy.max_attempts

    @property
    def actor_options(self) -> set[str]:
        """``throws``: exceptions that fail the message at once."""
        return {"throws"}

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            return
        actor = broker.get_actor(message.actor_name)
        throws = actor.options.get("throws")
        if throws and isinstance(exception, throws):
            message.fail()
            return
        retries = int(message.options.get("retries", 0))
        message.options["retries"] = retries + 1
        message.options["last_error"] = f"{type(exception).__name__}: {exception}"[:500]
        if retries + 1 >= self.max_attempts:  # that was the last attempt
            message.fail()
            return
        if isinstance(exception, dramatiq.Retry) and exception.delay is not None:
            delay = int(exception.delay)
        else:
            delay = int(self.policy.backoff(retries + 1) * 1000)
        attached(message).retry = (message.copy(), delay)
