"""One job being attempted, and the error that ends a job in the dead letters."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, TypeGuard

from common.keys import ACTOR_NAME
from settings import Limits, MailworkerError
from worker.deadletter import kept_payload

__all__ = ["JOB_ID_RULE", "DeadLetterError", "Job", "is_job_id", "single_message"]

# What a job id may be: it keys the job's records and goes into its Message-ID
# (``<id@domain>``). Producers write uuid4s; a wire-format producer may write its own.
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
JOB_ID_RULE = (
    "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
)


def is_job_id(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a usable job id (``JOB_ID_RULE``)."""
    return isinstance(value, str) and _JOB_ID.fullmatch(value) is not None


class DeadLetterError(MailworkerError):
    """Raised to end a job in the dead-letter queue; ``reason`` is DESIGN §6's."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(slots=True)
class Job:
    """One job being attempted: who it is and how to put it back on the queue.

    Attributes:
        id: the job id (Dramatiq's message id of a single job).
        attempt: this attempt's number (1 for the first).
        queue: the priority queue it came from.
        timestamp_ms: when it was first enqueued (``max_age`` counts from here).
        redis_id: the broker message it came in (for the redelivery count).
        message: the job as a single-job Dramatiq message (dead letters, reschedules).
        single: the broker message carries this job alone (not a bulk message).
    """

    id: str
    attempt: int
    queue: str
    timestamp_ms: int
    redis_id: str
    message: dict[str, Any]
    single: bool = True

    @property
    def age(self) -> float:
        """Seconds since it was enqueued."""
        return time.time() - self.timestamp_ms / 1000

    def payload(self, limits: Limits) -> bytes:
        """The single-job message as stored in a dead letter (requeue sends it again),
        kept without its content when it is larger than ``limits`` allow
        (``worker.deadletter.kept_payload``)."""
        data = dict(self.message)
        data["options"] = {
            k: v
            for k, v in data.get("options", {}).items()
            if k not in ("traceback", "eta")
        }
        return kept_payload(data, limits)


def single_message(
    job_id: str, queue: str, job: Any, timestamp_ms: int
) -> dict[str, Any]:
    """A job of a bulk message as the single-job message it would have been."""
    return {
        "queue_name": queue,
        "actor_name": ACTOR_NAME,
        "args": [],
        "kwargs": {"job": job},
        "options": {},
        "message_id": job_id,
        "message_timestamp": timestamp_ms,
    }
