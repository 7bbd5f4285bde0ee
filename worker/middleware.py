"""Dramatiq middleware of our own: bound log context per job."""

from __future__ import annotations

import threading
from typing import Any

import structlog
from dramatiq import Broker, Middleware, Worker
from dramatiq.broker import MessageProxy

__all__ = ["Draining", "LogContext"]


class LogContext(Middleware):
    """Binds ``job_id``, ``actor``, ``attempt`` and the job's ``metadata`` to every log line."""

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        job = message.kwargs.get("job") if isinstance(message.kwargs, dict) else None
        metadata = job.get("metadata") if isinstance(job, dict) else None
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            job_id=message.message_id,
            actor=message.actor_name,
            attempt=message.options.get("retries", 0) + 1,
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


class Draining(Middleware):
    """Sets ``event`` when the worker begins to shut down, so a bulk message in progress
    can hand its remaining jobs back to the queue instead of outliving the stop timeout."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def after_worker_boot(self, broker: Broker, worker: Worker) -> None:
        self.event.clear()

    def before_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        self.event.set()
