"""The client side of mailworker: the job schema and ``enqueue``.

Importing this package never imports the worker or any transport library.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from producers.enqueue import (
    BrokerAuthenticationError,
    BrokerUnavailableError,
    Producer,
)
from producers.job import SCHEMA_VERSION, Attachment, Mailbox, Notification, parse_job
from settings import JobValidationError, load_settings

__all__ = [
    "SCHEMA_VERSION",
    "Attachment",
    "BrokerAuthenticationError",
    "BrokerUnavailableError",
    "JobValidationError",
    "Mailbox",
    "Notification",
    "Producer",
    "default_producer",
    "enqueue",
    "enqueue_many",
    "parse_job",
]

_default: Producer | None = None
_lock = threading.Lock()


def default_producer() -> Producer:
    """The process-wide producer built from the configuration (``MAILWORKER_*``, the file)."""
    global _default
    with _lock:
        if _default is None:
            _default = Producer.from_settings(load_settings())
        return _default


def enqueue(notification: Notification, *, producer: Producer | None = None) -> str:
    """Enqueue one notification and return its job id (see ``Producer.enqueue``)."""
    return (producer or default_producer()).enqueue(notification)


def enqueue_many(
    notifications: Iterable[Notification],
    *,
    bulk: bool = True,
    producer: Producer | None = None,
) -> list[str]:
    """Enqueue many notifications in few round trips; return their job ids in order.

    ``bulk=False`` enqueues one broker message per job (see ``Producer.enqueue_many``).
    """
    return (producer or default_producer()).enqueue_many(notifications, bulk=bulk)
