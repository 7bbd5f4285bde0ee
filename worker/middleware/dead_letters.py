"""Every message Dramatiq itself gives up on becomes one of our dead letters."""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from dramatiq import Broker, Middleware
from dramatiq.broker import MessageProxy
from dramatiq.errors import ActorNotFound

from worker.broker.attached import attached, exception_of
from worker.broker.envelope import attempt_of, bulk_items, single_message
from worker.broker.keys import q_name
from worker.clock import iso_millis
from worker.metrics.recorder import recorder
from worker.records import dead_event
from worker.status import ErrorRecord, RecordFields, StatusStore

__all__ = ["DeadLetterCapture"]

log = structlog.get_logger("mailworker.broker")


def _dead_jobs(message: MessageProxy, queue: str) -> list[tuple[str, bytes]]:
    """(job id, dead-letter payload) for each job of a message Dramatiq gives up on.

    A bulk message's jobs each get their own, as the single job it would have been:
    requeueable on its own, and one already sent stays sent. Any other message gets one
    under its message id.
    """
    data = message.asdict()
    items = bulk_items(data)
    if items:
        stamp = data["message_timestamp"]
        return [
            (job_id, orjson.dumps(single_message(job_id, queue, job, stamp)))
            for job_id, job in items.items()
        ]
    data["options"] = {k: v for k, v in data["options"].items() if k != "traceback"}
    return [(message.message_id, orjson.dumps(data))]


class DeadLetterCapture(Middleware):
    """Keeps what Dramatiq dead-letters as our dead letters, with status records.

    That is an unknown actor, or an unexpected exception after every retry. Each job of
    a bulk message gets its record (a job already sent stays sent). The record is
    written before Dramatiq's nack takes the message off its queue
    (``SafeConsumer.nack`` applies it with the message's other writes). So a worker that
    dies between the two leaves the message to be redelivered, never a job whose record
    still says it waits.

    Args:
        status: where the records go.
    """

    def __init__(self, status: StatusStore) -> None:
        self._status = status

    def before_nack(self, broker: Broker, message: MessageProxy) -> None:
        work = attached(message)
        if work.dead is not None:
            return  # Dramatiq retries a nack that met a connection error
        exc = exception_of(message)
        reason = "unknown_actor" if isinstance(exc, ActorNotFound) else "unhandled"
        error: ErrorRecord = {
            "type": reason,
            "code": None,
            "service": None,
            "message": f"{type(exc).__name__}: {exc}"
            if exc
            else "dead-lettered by Dramatiq",
        }
        queue = q_name(message.queue_name)
        attempts = attempt_of(message.options) - 1
        jobs = _dead_jobs(message, queue)
        for job_id, payload in jobs:
            fields: RecordFields = {
                "id": job_id,
                "state": "dead",
                "reason": reason,
                "error": error,
                "queue": queue,
                "attempts": attempts,
                "dead_at": iso_millis(),
            }
            event: dict[str, Any] = {
                "attempt": attempts,
                "event": "dead",
                "reason": reason,
                "error": error,
            }
            packed = self._status.pack(
                job_id,
                fields,
                event=event,
                dead_payload=payload,
                outcome=("delivery.dead", dead_event(reason, error, attempts, {})),
            )
            work.writes.append(packed)
        work.dead = (reason, error["message"])
        recorder().dead(reason, len(jobs))

    def after_nack(self, broker: Broker, message: MessageProxy) -> None:
        reason, error = attached(message).dead or ("unhandled", None)
        log.error(
            "job_dead_lettered", reason=reason, job_id=message.message_id, error=error
        )
