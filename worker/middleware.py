"""Dramatiq middleware of our own: bound log context per job, draining, worker tuning."""

from __future__ import annotations

import os
import threading
from typing import Any

import structlog
from dramatiq import Broker, Middleware, Worker
from dramatiq.broker import MessageProxy

__all__ = ["DELAY_PREFETCH", "POLL_ENV", "Draining", "LogContext", "WorkerTuning"]


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


# Dramatiq's own environment variable for the idle poll (ms); lower case is its spelling.
POLL_ENV = "dramatiq_worker_timeout"

# Delayed messages (retries waiting for their time) a worker process holds in memory per
# thread. Dramatiq's default, 1,000 per thread, lets a backlog of retries grow a process
# by hundreds of MB; the rest wait in Redis.
DELAY_PREFETCH = 25


class WorkerTuning(Middleware):
    """Sets, before a worker starts its consumers, its idle poll (``poll_interval`` ms,
    else ``dramatiq_worker_timeout`` from the environment, as ``mailworker worker``
    sets it) and caps the delayed messages it prefetches (``DELAY_PREFETCH`` per thread).

    Dramatiq reads both from the environment once, when it is imported, which is too
    early for a command that imported it before it parsed its own options.
    """

    def __init__(self, poll_interval: int | None = None) -> None:
        self.poll_interval = poll_interval

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        poll = self.poll_interval or int(os.environ.get(POLL_ENV) or 0)
        if poll > 0:
            worker.worker_timeout = poll
        worker.delay_prefetch = min(
            worker.delay_prefetch, DELAY_PREFETCH * max(1, worker.worker_threads)
        )
