"""Binds each job's identity to every log line written while it runs."""

from __future__ import annotations

from typing import Any

import structlog
from dramatiq import Broker, Middleware
from dramatiq.broker import MessageProxy

from worker.broker.envelope import attempt_of

__all__ = ["LogContext"]


class LogContext(Middleware):
    """Binds ``job_id``, ``actor``, ``attempt`` and the job's ``metadata`` to every log line."""

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        job = message.kwargs.get("job") if isinstance(message.kwargs, dict) else None
        metadata = job.get("metadata") if isinstance(job, dict) else None
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            job_id=message.message_id,
            actor=message.actor_name,
            attempt=attempt_of(message.options),
            **({"metadata": metadata} if isinstance(metadata, dict) else {}),
        )

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        structlog.contextvars.clear_contextvars()

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        structlog.contextvars.clear_contextvars()
