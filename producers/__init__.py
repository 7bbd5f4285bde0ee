"""The client side of mailworker: the job schema and ``enqueue``.

Importing this package never imports the worker or any transport library.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterable

from producers.actions import Action, Closed
from producers.enqueue import Producer
from producers.events import Event
from producers.job import SCHEMA_VERSION, Attachment, Mailbox, Notification, parse_job
from producers.schedule import Cancelled, Scheduled, ScheduledPage
from settings import (
    BrokerAuthenticationError,
    BrokerUnavailableError,
    JobValidationError,
    config_path,
    load_settings,
    public_url,
)

__all__ = [
    "SCHEMA_VERSION",
    "Action",
    "Attachment",
    "BrokerAuthenticationError",
    "BrokerUnavailableError",
    "Cancelled",
    "Closed",
    "DefaultConfigurationWarning",
    "Event",
    "JobValidationError",
    "Mailbox",
    "Notification",
    "Producer",
    "Scheduled",
    "ScheduledPage",
    "ack_events",
    "cancel_scheduled",
    "close_actions",
    "default_producer",
    "enqueue",
    "enqueue_many",
    "list_scheduled",
    "parse_job",
    "read_events",
]

_default: Producer | None = None
_lock = threading.Lock()


class DefaultConfigurationWarning(UserWarning):
    """No configuration file and no ``MAILWORKER_BROKER_URL``: the default broker is used.

    Silence it with ``warnings.filterwarnings("ignore", category=...)`` where the
    default broker (``redis://127.0.0.1:6379/0``, namespace ``mailworker``) is meant.
    """


def default_producer() -> Producer:
    """The process-wide producer built from the configuration (``MAILWORKER_*``, the file).

    Warns (``DefaultConfigurationWarning``, once: the producer is built once) when neither
    ``MAILWORKER_CONFIG`` nor ``./mailworker.toml`` nor ``MAILWORKER_BROKER_URL`` exists,
    so the defaults are used.

    Raises:
        ConfigError: the configuration is invalid.
    """
    return _default_producer()


def _default_producer() -> Producer:
    # Called by the public functions only, so the warning points at their caller.
    global _default
    with _lock:
        if _default is None:
            settings = load_settings()
            if config_path() is None and not os.environ.get("MAILWORKER_BROKER_URL"):
                # A library warns (not logs) when its caller can fix the situation.
                warnings.warn(
                    "mailworker: no configuration found (no MAILWORKER_CONFIG, no "
                    f"mailworker.toml in {os.getcwd()}, no MAILWORKER_BROKER_URL): "
                    "enqueueing to the default broker "
                    f"{public_url(settings.broker_url.get_secret_value())}, namespace "
                    f"{settings.namespace!r}; set MAILWORKER_CONFIG or "
                    "MAILWORKER_BROKER_URL, or use Producer.from_url(...)",
                    DefaultConfigurationWarning,
                    stacklevel=3,
                )
            _default = Producer.from_settings(settings)
        return _default


def enqueue(notification: Notification, *, producer: Producer | None = None) -> str:
    """Enqueue one notification and return its job id (see ``Producer.enqueue``).

    Without ``producer``, the process-wide ``default_producer()`` is used.
    """
    return (producer or _default_producer()).enqueue(notification)


def enqueue_many(
    notifications: Iterable[Notification],
    *,
    bulk: bool = True,
    producer: Producer | None = None,
) -> list[str]:
    """Enqueue many notifications in few round trips.

    Returns their job ids in order.

    ``bulk=False`` enqueues one broker message per job (see ``Producer.enqueue_many``).
    Without ``producer``, the process-wide ``default_producer()`` is used.
    """
    chosen = producer or _default_producer()
    return chosen.enqueue_many(notifications, bulk=bulk)


def read_events(
    group: str,
    consumer: str,
    *,
    count: int = 100,
    block_ms: int = 0,
    pending: bool = False,
    producer: Producer | None = None,
) -> list[Event]:
    """Outcome events for ``consumer`` of the consumer group ``group``.

    Each is a dict: ``type``, ``id``, ``job_id``, ``at``, ``data`` (decoded) and
    ``stream_id`` (what ``ack_events`` takes). Without ``producer``, the process-wide
    ``default_producer()`` is used.
    """
    chosen = producer or _default_producer()
    return chosen.read_events(
        group, consumer, count=count, block_ms=block_ms, pending=pending
    )


def ack_events(
    group: str, stream_ids: list[str], *, producer: Producer | None = None
) -> int:
    """Acknowledge events ``group`` has handled; return how many were pending."""
    return (producer or _default_producer()).ack_events(group, stream_ids)


def close_actions(job_id: str, *, producer: Producer | None = None) -> Closed:
    """Close every e-mail action key of ``job_id``: later replies are refused ``closed``.

    Call it when the task moved on (another approver acted). Returns how many keys the
    job has and how many were closed now. Without ``producer``, the process-wide
    ``default_producer()`` is used.
    """
    return (producer or _default_producer()).close_actions(job_id)


def cancel_scheduled(job_id: str, *, producer: Producer | None = None) -> Cancelled:
    """Cancel a scheduled job before it is released to its queue: it never sends.

    Its status record then says ``cancelled``. A job already released (or sent) is
    left as it is: ``Cancelled.cancelled`` is False and ``state`` says where it is. A
    job waiting for a broker retry can be cancelled the same way; a bulk message's
    retry cannot (``Cancelled.bulk_jobs`` says how many jobs it carries). A cancel
    releases the job's ``idempotency_key``. Without ``producer``, the process-wide
    ``default_producer()`` is used.
    """
    return (producer or _default_producer()).cancel_scheduled(job_id)


def list_scheduled(
    *,
    limit: int = 50,
    offset: int = 0,
    producer: Producer | None = None,
) -> ScheduledPage:
    """A page of the scheduled set (scheduled sends, long retries), soonest first."""
    chosen = producer or _default_producer()
    return chosen.list_scheduled(limit=limit, offset=offset)
