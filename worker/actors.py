"""The delivery actor's body: validate, deliver, record the outcome, map it to the broker."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import dramatiq
import structlog
from dramatiq.middleware import CurrentMessage

from common.envelope import envelope
from common.keys import ACTOR_NAME
from producers.job import Notification, parse_job
from settings import JobValidationError, Settings
from settings.models import EventType
from worker import records
from worker.actions.keys import ActionKeys
from worker.actions.render import personal
from worker.attempt import Job
from worker.broker.attached import PackedWrite, attached
from worker.bulk import SingleJobs
from worker.deadletter import content_size
from worker.delivery import Deliverer, Outcome, Parcel
from worker.inbound.suppression import Suppressed, SuppressionList
from worker.logging import show_address
from worker.metrics.recorder import recorder
from worker.status import ErrorRecord, JobStart, RecordFields, StatusStore

__all__ = ["JobHandler", "Prepared"]

log = structlog.get_logger("mailworker.job")

# A job whose send_at is at most this many seconds ahead is sent: the workers' and the
# producers' clocks may be a little apart.
_EARLY_S = 1.0


@dataclass(slots=True)
class Prepared:
    """A job validated and begun: its earlier outcomes, whom it is for, what to send."""

    start: JobStart
    wanted: list[str]
    parcel: Parcel
    suppressed: dict[str, Suppressed]


class JobHandler:
    """Runs one attempt of one job: the ``deliver`` actor.

    Args:
        settings: the configuration.
        status: the status store.
        deliverer: the services in delivery order.
        broker: where a job waiting for a budget is put back.
        single_jobs: the single jobs running in this process, which bulk messages
            wait for.
        suppression: the suppression list recipients are looked up in.
        actions: issues e-mail action keys (None: ``[email_actions]`` is off).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        status: StatusStore,
        deliverer: Deliverer,
        broker: dramatiq.Broker,
        single_jobs: SingleJobs | None = None,
        suppression: SuppressionList | None = None,
        actions: ActionKeys | None = None,
    ) -> None:
        self._broker = broker
        self._actions = actions
        self._suppression = suppression
        self._single_jobs = single_jobs or SingleJobs()
        self._settings = settings
        self._status = status
        self._deliverer = deliverer

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        """The ``deliver`` actor: one job. Every outcome is a status record.

        A job that dies is kept in our dead letters (with its record) and then acknowledged.

        Raises:
            dramatiq.Retry: the job is tried again later, with the delay it carries.
        """
        message = CurrentMessage.get_current_message()
        assert message is not None, "the CurrentMessage middleware is required"
        job = Job.from_message(message)
        with self._single_jobs.running():
            if args or set(kwargs) != {"job"}:
                error = "expected one keyword argument, 'job'"
                self.invalid(job, JobValidationError("kwargs", error))
                return
            self._run(job, kwargs["job"])

    def _run(self, job: Job, data: Any) -> None:
        ready = self.prepare(job, data)
        if ready is None:
            return
        parcel = ready.parcel
        outcome = (
            self._deliverer.deliver(
                job.id,
                parcel.notification,
                parcel.recipients,
                extra_headers=parcel.extra_headers,
                personal=parcel.personal,
            )
            if parcel.recipients
            else Outcome()
        )
        self.finish(job, ready, outcome)

    def prepare(self, job: Job, data: Any) -> Prepared | None:
        """Validate, begin, and work out whom this attempt still sends to.

        Returns:
            What to send, or None when the job ended in the dead letters: invalid,
            expired, too old or redelivered too often.
        """
        try:
            notification = self._validate(data)
        except JobValidationError as exc:
            self.invalid(job, exc)
            return None
        if (
            notification.not_after is not None
            and notification.not_after <= datetime.now(UTC)
        ):
            self._dead(job, "expired", records.error("expired", "not_after has passed"))
            return None
        if notification.send_at is not None and self._early(job, notification.send_at):
            return None
        if job.age > self._settings.retry.max_age:
            error = records.error("max_age", f"job is {job.age:.0f}s old")
            self._dead(job, "max_age", error)
            return None
        start = self._status.begin(job.ref)
        if start.redeliveries >= self._settings.retry.redelivery_limit:
            message = f"its worker died {start.redeliveries} times"
            error = records.error("redelivery_limit", message)
            self._dead(job, "redelivery_limit", error)
            return None
        if start.in_doubt(job.attempt):
            # The last process died between sending and recording: a server may have it.
            log.warning(
                "delivery_in_doubt", job_id=job.id, redeliveries=start.redeliveries
            )
        redirect = self._settings.redirect_all_to
        wanted = [redirect] if redirect else notification.recipients
        pending = tuple(
            r for r in wanted if r not in start.accepted and r not in start.refused
        )
        suppressed: dict[str, Suppressed] = {}
        if start.suppressing and self._suppression is not None and pending:
            suppressed = self._suppression.check(pending)
            pending = tuple(r for r in pending if r not in suppressed)
            if not pending and not start.accepted.intersection(wanted):
                self._all_suppressed(job, wanted, start, suppressed)
                return None
        headers = (
            {"X-Mailworker-Redirected-From": ", ".join(notification.recipients)}
            if redirect
            else None
        )
        parcel = Parcel(job.id, notification, pending, headers)
        if notification.actions and self._actions is not None:
            keys = self._actions.issue(job.id, notification, pending)
            actions = self._settings.email_actions
            parcel.personal = {
                r: personal(notification, keys[r], actions) for r in pending
            }
        return Prepared(start, wanted, parcel, suppressed)

    def _early(self, job: Job, send_at: datetime) -> bool:
        """A job that came before its ``send_at`` (a wire producer's) waits for it.

        It goes into the scheduled set, due at ``send_at``: ``retry.max_age`` counts
        from then. Returns False when it is due (within ``_EARLY_S``, for clocks a
        little apart).
        """
        ahead = (send_at - datetime.now(UTC)).total_seconds()
        if ahead <= _EARLY_S:
            return False
        limit = self._settings.limits.max_schedule_ahead
        if ahead > limit + _EARLY_S:
            reason = f"more than {limit:.0f}s ahead (limits.max_schedule_ahead)"
            self.invalid(job, JobValidationError("send_at", reason))
            return True
        due = send_at.astimezone(UTC).isoformat(timespec="milliseconds")
        self.reschedule(
            job, ahead, count=False, timestamp_ms=int(send_at.timestamp() * 1000)
        )
        self._write(
            job.id,
            {
                "id": job.id,
                "state": "scheduled",
                "reason": "",
                "queue": job.queue,
                "attempts": job.attempt - 1,
                "send_at": due,
            },
            event={"attempt": job.attempt - 1, "event": "scheduled"},
            # Kept status.ttl after the send time, as a producer's scheduled record is.
            keep_for=self._settings.status.ttl + int(ahead) + 1,
        )
        log.info("job_scheduled", job_id=job.id, send_at=due)
        return True

    def _all_suppressed(
        self,
        job: Job,
        wanted: list[str],
        start: JobStart,
        suppressed: dict[str, Suppressed],
    ) -> None:
        """End a job none of whose recipients is left to send to, some suppressed."""
        recipients = records.merge_recipients(start, wanted, Outcome())
        for i, entry in enumerate(recipients):
            hit = suppressed.get(entry["address"])
            if hit is not None:
                recipients[i] = records.suppressed_recipient(
                    entry["address"], hit["reason"]
                )
        reason = "suppressed" if len(suppressed) == len(set(wanted)) else "permanent"
        self._write(
            job.id, {"recipients": recipients, "counts": records.counts(recipients)}
        )
        names = ", ".join(show_address(a) for a in suppressed)
        message = f"every recipient is suppressed or refused ({names} suppressed)"
        self._dead(job, reason, records.error(reason, message))

    def invalid(self, job: Job, exc: JobValidationError) -> None:
        """End ``job`` in the dead letters as invalid, naming the field at fault."""
        error = records.error("validation", str(exc), field=exc.field)
        self._dead(job, "validation", error)

    def _validate(self, data: Any) -> Notification:
        limits = self._settings.limits
        if isinstance(data, dict) and content_size(data) > limits.max_message_bytes:
            # Surely too large: refused before its attachments are decoded (a copy of
            # each, and its base64 text again on the way).
            raise JobValidationError(
                "attachments", "larger than limits.max_message_bytes"
            )
        notification = parse_job(data)
        notification.check_size(limits)
        if notification.actions and self._actions is None:
            raise JobValidationError(
                "actions", "e-mail actions are off on this worker ([email_actions])"
            )
        self._deliverer.order(notification)  # a `sender` naming no service is invalid
        return notification

    def finish(self, job: Job, ready: Prepared, outcome: Outcome) -> None:
        """Record what the attempt achieved and map it to sent, dead, wait or retry."""
        if ready.start.previous_state == "sent" and not ready.parcel.recipients:
            log.info("job_already_sent", job_id=job.id)  # redelivered after its record
            return
        start, wanted, notification = (
            ready.start,
            ready.wanted,
            ready.parcel.notification,
        )
        recipients = records.merge_recipients(start, wanted, outcome)
        for i, entry in enumerate(recipients):
            hit = ready.suppressed.get(entry["address"])
            if hit is not None:
                recipients[i] = records.suppressed_recipient(
                    entry["address"], hit["reason"]
                )
        counts = records.counts(recipients)
        _count_attempt(outcome)
        # Before the attempt's own entry, and like it with the message's ack.
        for doubt in records.in_doubt_events(job.attempt, outcome):
            self._write(job.id, {}, event=doubt)
        fields: RecordFields = {
            "recipients": recipients,
            "counts": counts,
            # Some recipients have it, others not (refused, or not yet): never reads as
            # a plain success or a plain failure.
            "partial": 0 < counts["accepted"] < len(recipients),
            "skipped": outcome.skipped,
            "attempts": job.attempt,
            "metadata": notification.metadata,
        }
        if outcome.service and outcome.receipt.accepted:
            fields.update(
                {"service": outcome.service, "message_id": outcome.message_id}
            )
            log.info(
                "delivery_succeeded",
                service=outcome.service,
                accepted=[show_address(a) for a in outcome.receipt.accepted],
                refused=len(outcome.receipt.refused),
                deferred=len(outcome.receipt.deferred),
                smtp_response=outcome.receipt.response,
            )
        error = outcome.last_error.as_record() if outcome.last_error else None
        accepted = outcome.receipt.accepted
        if outcome.finished:
            if counts["accepted"]:
                fields.update(
                    {
                        "state": "sent",
                        "reason": "",
                        "error": None,
                        "next_attempt_at": "",
                    }
                )
                if counts["refused"]:
                    fields["reason"] = "partial"
                    fields["error"] = records.partial_error(recipients, outcome.service)
                self._write(
                    job.id,
                    fields,
                    accepted=accepted,
                    event=records.event(job.attempt, "sent", outcome),
                    outcome=("delivery.sent", records.sent_event(fields)),
                )
                if outcome.service:
                    recorder().delivered(outcome.service, job.queue, job.age)
                return
            fields["error"] = error = error or records.refused_error(outcome)
            self._write(job.id, fields, accepted=accepted)
            self._dead(job, "permanent", error)
            return
        if outcome.only_waiting:
            self._wait(job, outcome, fields)
            return
        fields["error"] = error = error or records.deferred_error(outcome)
        self._retry(job, outcome, fields, accepted, error)

    def _wait(self, job: Job, outcome: Outcome, fields: RecordFields) -> None:
        """Every service is spent or cooling down, so come back later.

        Waiting is not an attempt.
        """
        delay = max(1.0, outcome.wait or 0.0)
        reason = outcome.skipped[-1]["reason"] if outcome.skipped else "budget"
        if math.isinf(delay):  # more recipients than a whole budget: no wait helps
            self._write(job.id, fields)
            message = outcome.skipped[-1]["message"] if outcome.skipped else reason
            self._dead(job, "permanent", records.error(reason, message))
            return
        if job.age + delay > self._settings.retry.max_age:
            self._write(job.id, fields)
            error = records.error(reason, "waited past retry.max_age")
            self._dead(job, "max_age", error)
            return
        next_at = (datetime.now(UTC) + timedelta(seconds=delay)).isoformat(
            timespec="seconds"
        )
        # Put it back with the same retry count. If that fails the actor raises and the
        # broker retries the message, so nothing is lost.
        self.reschedule(job, delay, count=False)
        fields.update(
            {
                "state": "retrying",
                "reason": reason,
                "next_attempt_at": next_at,
                "error": None,
            }
        )
        self._write(
            job.id,
            fields,
            event={"attempt": job.attempt, "event": "waiting", "reason": reason},
        )
        recorder().waited(reason)
        log.info("job_waiting", reason=reason, delay_s=round(delay, 1))

    def _retry(
        self,
        job: Job,
        outcome: Outcome,
        fields: RecordFields,
        accepted: list[str],
        error: ErrorRecord,
    ) -> None:
        policy = self._settings.retry
        if job.attempt >= policy.max_attempts:
            self._write(job.id, fields, accepted=accepted)
            self._dead(job, "retries_exhausted", error)
            return
        delay = max(policy.backoff(job.attempt), outcome.retry_after or 0.0)
        if job.age + delay > policy.max_age:
            self._write(job.id, fields, accepted=accepted)
            self._dead(job, "max_age", error)
            return
        next_at = (datetime.now(UTC) + timedelta(seconds=delay)).isoformat(
            timespec="seconds"
        )
        fields.update(
            {
                "state": "retrying",
                "reason": "retry_scheduled",
                "next_attempt_at": next_at,
            }
        )
        self._write(
            job.id,
            fields,
            accepted=accepted,
            event={
                **records.event(job.attempt, "retrying", outcome),
                "error": error,
            },
        )
        recorder().retried(error["type"])
        log.warning(
            "job_retry_scheduled",
            job_id=job.id,
            delay_s=round(delay, 1),
            error=error["message"],
        )
        if job.single:
            raise dramatiq.Retry(message=error["message"], delay=int(delay * 1000))
        self.reschedule(job, delay, count=True)

    def reschedule(
        self, job: Job, delay: float, *, count: bool, timestamp_ms: int | None = None
    ) -> None:
        """Put the job back as a single job after ``delay`` seconds.

        ``count`` says whether the attempt just made counts toward ``max_attempts``.
        ``timestamp_ms`` replaces the time ``retry.max_age`` counts from. A delay
        longer than a few seconds waits in the scheduled set (``MailBroker.enqueue``).
        """
        options = {
            k: v
            for k, v in job.message.get("options", {}).items()
            if k not in ("eta", "redis_message_id", "traceback")
        }
        options["retries"] = job.attempt if count else job.attempt - 1
        fields = envelope(
            job.id,
            job.queue,
            ACTOR_NAME,
            job.message["kwargs"],
            options=options,
            timestamp_ms=job.timestamp_ms if timestamp_ms is None else timestamp_ms,
        )
        message: dramatiq.Message[Any] = dramatiq.Message(**{**fields, "args": ()})
        current = CurrentMessage.get_current_message()
        if current is None:
            self._broker.enqueue(message, delay=int(delay * 1000))
        else:
            attached(current).enqueues.append((message, int(delay * 1000)))

    def _write(
        self,
        job_id: str,
        fields: RecordFields,
        *,
        accepted: list[str] | None = None,
        event: dict[str, Any] | None = None,
        dead_payload: bytes | None = None,
        outcome: tuple[EventType, dict[str, Any]] | None = None,
        keep_for: float | None = None,
    ) -> None:
        """Write a job's record with the ack (or nack) of its broker message.

        Both go in the same round trip, inside Dramatiq's loop that tries again until
        Redis answers. Outside a worker the record is written at once. Once a message
        went out nothing here needs Redis, so nothing can raise and lose what became of it.
        """
        self.record(
            self._status.pack(
                job_id,
                fields,
                accepted=accepted,
                event=event,
                dead_payload=dead_payload,
                outcome=outcome,
                keep_for=keep_for,
            )
        )

    def record(self, packed: PackedWrite) -> None:
        """Apply ``packed`` with the current message's ack, or at once outside a worker."""
        message = CurrentMessage.get_current_message()
        if message is None:
            self._status.write_many([packed])
        else:
            attached(message).writes.append(packed)

    def _dead(self, job: Job, reason: str, error: ErrorRecord) -> None:
        """End ``job`` in the dead letters: its record, history entry and message."""
        self._write(
            job.id,
            {
                "id": job.id,
                "state": "dead",
                "reason": reason,
                "error": error,
                "attempts": job.attempt,
                "next_attempt_at": "",
                "dead_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            },
            event={
                "attempt": job.attempt,
                "event": "dead",
                "reason": reason,
                "error": error,
            },
            dead_payload=job.payload(self._settings.limits),
            outcome=(
                "delivery.dead",
                records.dead_event(reason, error, job.attempt, _metadata(job)),
            ),
        )
        recorder().dead(reason)
        log.error(
            "job_dead_lettered",
            job_id=job.id,
            reason=reason,
            error=error.get("message"),
        )


def _count_attempt(outcome: Outcome) -> None:
    """Count an attempt's failed tries and skipped services, once, where it ends.

    Recipients a server refused (5xx) or deferred (4xx) count once per attempt as a
    ``recipient_refused`` or ``transient`` failure of that service.
    """
    metrics = recorder()
    receipt = outcome.receipt
    if not metrics.enabled or not (
        outcome.skipped or receipt.refused or receipt.deferred
    ):
        return
    failures: list[tuple[str, str]] = []
    skips: list[tuple[str, str]] = []
    for skip in outcome.skipped:
        pair = (skip["service"], skip["reason"])
        (skips if skip["reason"] in _SKIPS else failures).append(pair)
    error = outcome.last_error
    service = outcome.service or (error.service if error is not None else "")
    if receipt.refused:
        failures.append((service, "recipient_refused"))
    if receipt.deferred:
        failures.append((service, "transient"))
    metrics.attempt(failures, skips)


# Services passed over without a try (Deliverer._note_skip), not failures.
_SKIPS = frozenset({"budget", "breaker_open"})


def _metadata(job: Job) -> dict[str, Any]:
    """The job's ``metadata`` as its producer wrote it, or {} (an invalid job)."""
    data = (job.message.get("kwargs") or {}).get("job")
    metadata = data.get("metadata") if isinstance(data, dict) else None
    return metadata if isinstance(metadata, dict) else {}
