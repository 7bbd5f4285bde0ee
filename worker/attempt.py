"""One job being attempted: who it is, and how it came and goes back."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from dramatiq.message import Message

from settings import Limits
from worker.broker.envelope import JobRef, attempt_of, single_message
from worker.broker.keys import q_name
from worker.deadletter import kept_payload

__all__ = ["Job"]


@dataclass(slots=True)
class Job:
    """One job being attempted.

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

    @classmethod
    def from_message(cls, message: Message[Any]) -> Job:
        """The job (single, or a whole bulk message) a broker message carries."""
        return cls(
            id=message.message_id,
            attempt=attempt_of(message.options),
            queue=q_name(message.queue_name),
            timestamp_ms=message.message_timestamp,
            redis_id=str(message.options.get("redis_message_id", "")),
            message=message.asdict(),
        )

    def item(self, job_id: str, data: Any) -> Job:
        """One job of this bulk message, as the single job it would have been."""
        return Job(
            id=job_id,
            attempt=self.attempt,
            queue=self.queue,
            timestamp_ms=self.timestamp_ms,
            redis_id=self.redis_id,
            message=single_message(job_id, self.queue, data, self.timestamp_ms),
            single=False,
        )

    @property
    def ref(self) -> JobRef:
        """The job as status records know it."""
        return JobRef(self.id, self.attempt, self.queue, self.redis_id)

    @property
    def age(self) -> float:
        """Seconds since it was enqueued."""
        return time.time() - self.timestamp_ms / 1000

    def payload(self, limits: Limits) -> bytes:
        """The single-job message as its dead letter keeps it (requeue sends it again).

        Kept without its content when it is larger than ``limits`` allow
        (``worker.deadletter.kept_payload``).
        """
        data = dict(self.message)
        data["options"] = {
            k: v
            for k, v in data.get("options", {}).items()
            if k not in ("traceback", "eta")
        }
        return kept_payload(data, limits)
