"""The delivery actor's body: validate, deliver, record the outcome, map it to the broker."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import dramatiq
import structlog
from dramatiq.middleware import CurrentMessage

from common.keys import ACTOR_NAME
from producers.job import Notification, parse_job
from settings import JobValidationError, Settings
from worker import records
from worker.deadletter import content_size
from worker.delivery import Deliverer, Outcome, Parcel
from worker.express import Express
from worker.jobs import JOB_ID_RULE, DeadLetterError, Job, is_job_id, single_message
from worker.logging import lines_together, show_address
from worker.reliability import attach_enqueue, attach_write
from worker.status import JobStart, PackedWrite, StatusStore

__all__ = ["JobHandler"]

log = structlog.get_logger("mailworker.job")

# A bulk message that has run this long sends no more of its jobs: the rest go back to
# the queue as single jobs. There is no other time limit: each step of a send is bounded
# by its service's timeout, and cutting a send off (Dramatiq's TimeLimit raises into the
# thread wherever it is) would leave its outcome unknown.
BULK_TIME_LIMIT = 600.0


@dataclass(slots=True)
class _Ready:
    """A job validated and begun: its earlier outcomes, whom it is for, what to send."""

    start: JobStart
    wanted: list[str]
    parcel: Parcel


class JobHandler:
    """Runs one attempt of one job.

    Args:
        settings: the configuration.
        status: the status store.
        deliverer: the services in delivery order.
        broker: where a job waiting for a budget is put back.
        draining: set when the worker stops: a bulk message hands its rest back.
        express: the single jobs running in this process, which bulk messages wait for.
        bulk_time_limit: seconds a bulk message without a ``time_limit`` option may run
            before the jobs it has not begun go back to the queue.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        status: StatusStore,
        deliverer: Deliverer,
        broker: dramatiq.Broker,
        draining: threading.Event | None = None,
        express: Express | None = None,
        bulk_time_limit: float = BULK_TIME_LIMIT,
    ) -> None:
        self._bulk_time_limit = bulk_time_limit
        self._broker = broker
        self._draining = draining or threading.Event()
        self._express = express or Express()
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
        job = Job(
            id=message.message_id,
            attempt=int(message.options.get("retries", 0)) + 1,
            queue=message.queue_name.removesuffix(".DQ"),
            timestamp_ms=message.message_timestamp,
            redis_id=str(message.options.get("redis_message_id", "")),
            message=message.asdict(),
        )
        with self._express.running(), contextlib.suppress(DeadLetterError):
            if args or set(kwargs) != {"job"}:
                self._invalid(
                    job,
                    JobValidationError(
                        "kwargs", "expected one keyword argument, 'job'"
                    ),
                )
            self._run(job, kwargs["job"])

    def batch(self, *args: Any, **kwargs: Any) -> None:
        """The ``deliver_batch`` actor: many jobs in one broker message (``enqueue_many``).

        Each job keeps its own id, status record, marker, retries and dead letter: a job
        to be retried later is put back on the queue as a single job.
        """
        message = CurrentMessage.get_current_message()
        assert message is not None, "the CurrentMessage middleware is required"
        queue = message.queue_name.removesuffix(".DQ")
        items = kwargs.get("jobs")
        whole = Job(
            message.message_id,
            int(message.options.get("retries", 0)) + 1,
            queue,
            message.message_timestamp,
            str(message.options.get("redis_message_id", "")),
            message.asdict(),
        )
        if args or set(kwargs) != {"jobs"} or not isinstance(items, list):
            with contextlib.suppress(DeadLetterError):
                self._invalid(
                    whole, JobValidationError("jobs", "expected a list of jobs")
                )
            return
        jobs = self._with_ids(items, whole)
        if self._draining.is_set():
            self._hand_back(jobs, whole)
            return
        ready: list[tuple[Any, Job, _Ready]] = []
        for item in jobs:
            job = Job(
                id=item["id"],
                attempt=whole.attempt,
                queue=queue,
                timestamp_ms=message.message_timestamp,
                redis_id=whole.redis_id,
                message=single_message(
                    item["id"], queue, item.get("job"), message.message_timestamp
                ),
                single=False,
            )
            with contextlib.suppress(DeadLetterError):
                ready.append((item, job, self._prepare(job, item.get("job"))))
        # First tries go out as one pipelined run, which stops early when the worker
        # stops and, before each message, lets the process' running single jobs finish
        # first; what follows (retries, failover, records) is job by job.
        sending = [i for i, (_, _, r) in enumerate(ready) if r.parcel.recipients]
        parcels = [ready[i][2].parcel for i in sending]
        outcomes = dict(
            zip(
                sending,
                self._deliverer.deliver_many(
                    parcels, stop=self._pausing(self._time_limit(message))
                ),
                strict=True,
            )
        )
        unsent = []
        # The jobs' lines are written together (their records too go out together, with
        # the message's ack).
        with lines_together():
            for index, (item, job, r) in enumerate(ready):
                outcome = outcomes.get(index, Outcome())
                if outcome is None:
                    unsent.append(item)
                    continue
                structlog.contextvars.bind_contextvars(job_id=job.id)
                with contextlib.suppress(DeadLetterError):
                    self._finish(job, r, outcome)
        if unsent:
            self._hand_back(unsent, whole)

    def _with_ids(self, items: list[Any], whole: Job) -> list[dict[str, Any]]:
        """The jobs of a bulk message that have a usable id of their own, each once.

        The others can have no record of their own: the bulk message is dead-lettered
        for them (``validation``, the field of the first named), and the rest go on.
        """
        usable: list[dict[str, Any]] = []
        seen: set[str] = set()
        bad: list[tuple[int, bool]] = []  # index, whether its id repeats an earlier one
        for index, item in enumerate(items):
            job_id = item.get("id") if isinstance(item, dict) else None
            if is_job_id(job_id) and job_id not in seen:
                seen.add(job_id)
                usable.append(item)
            else:
                bad.append((index, isinstance(job_id, str) and job_id in seen))
        if bad:
            index, repeated = bad[0]
            problem = (
                "repeats an earlier job's id" if repeated else f"is not {JOB_ID_RULE}"
            )
            with contextlib.suppress(DeadLetterError):
                self._invalid(
                    whole,
                    JobValidationError(
                        f"jobs[{index}].id",
                        f"{problem} ({len(bad)} of {len(items)} jobs without a usable "
                        "id; the others go on)",
                    ),
                )
        return usable

    def _pausing(self, time_limit: float) -> Callable[[], bool]:
        """For one bulk message, what to call before each of its messages: True when
        the worker stops or the message has run ``time_limit`` seconds (its jobs not yet
        sent go back to the queue: a message once begun is never cut off mid-send); first
        it waits while single jobs of this process run, up to ``Express.limit`` in all
        (see ``worker.express``)."""
        budget = self._express.limit
        deadline = time.monotonic() + time_limit

        def next_message() -> bool:
            nonlocal budget
            if self._draining.is_set():
                return True
            budget -= self._express.wait(budget)
            if time.monotonic() >= deadline:
                return True
            return self._draining.is_set()

        return next_message

    def _time_limit(self, message: dramatiq.Message[Any]) -> float:
        """Seconds a bulk message may run: its ``time_limit`` option (ms) if it has
        one, else the worker's (``BULK_TIME_LIMIT``)."""
        limit = message.options.get("time_limit")
        return limit / 1000 if limit else self._bulk_time_limit

    def _hand_back(self, items: list[Any], whole: Job) -> None:
        """The worker is stopping, or the bulk message ran out of time: put the jobs not
        yet started back as single jobs."""
        for item in items:
            message = single_message(
                item["id"], whole.queue, item.get("job"), whole.timestamp_ms
            )
            job = Job(
                item["id"],
                whole.attempt,
                whole.queue,
                whole.timestamp_ms,
                whole.redis_id,
                message,
            )
            self._reschedule(job, 0, count=False)
        jobs = [(i["id"], whole.attempt, whole.queue, whole.redis_id) for i in items]
        for packed in self._status.unbegin_writes(jobs):
            self._record(packed)
        log.info("bulk_handed_back", jobs=len(items))

    def _run(self, job: Job, data: Any) -> None:
        ready = self._prepare(job, data)
        parcel = ready.parcel
        outcome = (
            self._deliverer.deliver(
                job.id,
                parcel.notification,
                parcel.recipients,
                extra_headers=parcel.extra_headers,
            )
            if parcel.recipients
            else Outcome()
        )
        self._finish(job, ready, outcome)

    def _prepare(self, job: Job, data: Any) -> _Ready:
        """Validate, begin, and work out whom this attempt still sends to.

        Raises:
            DeadLetterError: the job is invalid, expired, too old or redelivered too often.
        """
        try:
            notification = self._validate(data)
        except JobValidationError as exc:
            self._invalid(job, exc)
        if (
            notification.not_after is not None
            and notification.not_after <= datetime.now(UTC)
        ):
            self._dead(job, "expired", records.error("expired", "not_after has passed"))
        if job.age > self._settings.retry.max_age:
            self._dead(
                job, "max_age", records.error("max_age", f"job is {job.age:.0f}s old")
            )
        start = self._status.begin(
            job.id, attempt=job.attempt, queue=job.queue, redis_id=job.redis_id
        )
        if start.redeliveries >= self._settings.retry.redelivery_limit:
            message = f"its worker died {start.redeliveries} times"
            self._dead(
                job, "redelivery_limit", records.error("redelivery_limit", message)
            )
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
        headers = (
            {"X-Mailworker-Redirected-From": ", ".join(notification.recipients)}
            if redirect
            else None
        )
        return _Ready(start, wanted, Parcel(job.id, notification, pending, headers))

    def _invalid(self, job: Job, exc: JobValidationError) -> NoReturn:
        self._dead(
            job, "validation", records.error("validation", str(exc), field=exc.field)
        )

    def _validate(self, data: Any) -> Notification:
        limits = self._settings.limits
        if isinstance(data, dict) and content_size(data) > limits.max_message_bytes:
            # Surely too large: refused before its attachments are decoded (a copy of
            # each, and its base64 text again on the way).
            raise JobValidationError(
                "attachments", "larger than limits.max_message_bytes"
            )
        notification = parse_job(data)
        count = len(notification.to) + len(notification.cc) + len(notification.bcc)
        if count > limits.max_recipients:
            raise JobValidationError(
                "to", f"{count} recipients; at most {limits.max_recipients}"
            )
        if notification.estimated_size() > limits.max_message_bytes:
            raise JobValidationError(
                "attachments", "larger than limits.max_message_bytes"
            )
        self._deliverer.order(notification)  # a `sender` naming no service is invalid
        return notification

    def _finish(self, job: Job, ready: _Ready, outcome: Outcome) -> None:
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
        counts = records.counts(recipients)
        # Before the attempt's own entry, and like it with the message's ack.
        for doubt in records.in_doubt_events(job.attempt, outcome):
            self._write(job.id, {}, event=doubt)
        fields: dict[str, Any] = {
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
            fields.update(service=outcome.service, message_id=outcome.message_id)
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
                fields.update(state="sent", reason="", error=None, next_attempt_at="")
                if counts["refused"]:
                    fields.update(
                        reason="partial",
                        error=records.partial_error(recipients, outcome.service),
                    )
                self._write(
                    job.id,
                    fields,
                    accepted=accepted,
                    event=records.event(job.attempt, "sent", outcome),
                )
                return
            fields["error"] = error or records.refused_error(outcome)
            self._write(job.id, fields, accepted=accepted)
            self._dead(job, "permanent", fields["error"])
        if outcome.only_waiting:
            self._wait(job, outcome, fields)
            return
        fields["error"] = error or records.deferred_error(outcome)
        self._retry(job, outcome, fields, accepted)

    def _wait(self, job: Job, outcome: Outcome, fields: dict[str, Any]) -> None:
        """Every service is spent or cooling down: come back later; not an attempt."""
        delay = max(1.0, outcome.wait or 0.0)
        reason = outcome.skipped[-1]["reason"] if outcome.skipped else "budget"
        if job.age + delay > self._settings.retry.max_age:
            self._write(job.id, fields)
            self._dead(
                job, "max_age", records.error(reason, "waited past retry.max_age")
            )
        next_at = (datetime.now(UTC) + timedelta(seconds=delay)).isoformat(
            timespec="seconds"
        )
        # Put it back with the same retry count; if that fails the actor raises and the
        # broker retries the message: nothing is lost.
        self._reschedule(job, delay, count=False)
        fields.update(
            state="retrying", reason=reason, next_attempt_at=next_at, error=None
        )
        self._write(
            job.id,
            fields,
            event={"attempt": job.attempt, "event": "waiting", "reason": reason},
        )
        log.info("job_waiting", reason=reason, delay_s=round(delay, 1))

    def _retry(
        self, job: Job, outcome: Outcome, fields: dict[str, Any], accepted: list[str]
    ) -> None:
        policy = self._settings.retry
        if job.attempt >= policy.max_attempts:
            self._write(job.id, fields, accepted=accepted)
            self._dead(job, "retries_exhausted", fields["error"])
        # Up to half again at random: jobs that failed together (an outage) come back
        # spread out, never below min_backoff, never above max_backoff.
        base = policy.min_backoff * 2 ** (job.attempt - 1)
        delay = max(
            min(policy.max_backoff, random.uniform(base, 1.5 * base)),
            outcome.retry_after or 0.0,
        )
        if job.age + delay > policy.max_age:
            self._write(job.id, fields, accepted=accepted)
            self._dead(job, "max_age", fields["error"])
        next_at = (datetime.now(UTC) + timedelta(seconds=delay)).isoformat(
            timespec="seconds"
        )
        fields.update(
            state="retrying", reason="retry_scheduled", next_attempt_at=next_at
        )
        self._write(
            job.id,
            fields,
            accepted=accepted,
            event={
                **records.event(job.attempt, "retrying", outcome),
                "error": fields["error"],
            },
        )
        log.warning(
            "job_retry_scheduled",
            job_id=job.id,
            delay_s=round(delay, 1),
            error=fields["error"]["message"],
        )
        if job.single:
            raise dramatiq.Retry(
                message=fields["error"]["message"], delay=int(delay * 1000)
            )
        self._reschedule(job, delay, count=True)

    def _reschedule(self, job: Job, delay: float, *, count: bool) -> None:
        """Put the job back as a single job after ``delay`` seconds; ``count`` says whether
        the attempt just made counts toward ``max_attempts``."""
        options = {
            k: v
            for k, v in job.message.get("options", {}).items()
            if k not in ("eta", "redis_message_id", "traceback")
        }
        options["retries"] = job.attempt if count else job.attempt - 1
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=job.queue,
            actor_name=ACTOR_NAME,
            args=(),
            kwargs=job.message["kwargs"],
            options=options,
            message_id=job.id,
            message_timestamp=job.timestamp_ms,
        )
        current = CurrentMessage.get_current_message()
        if current is None:
            self._broker.enqueue(message, delay=int(delay * 1000))
        else:
            attach_enqueue(current, (message, int(delay * 1000)))

    def _write(
        self,
        job_id: str,
        fields: dict[str, Any],
        *,
        accepted: list[str] | None = None,
        event: dict[str, Any] | None = None,
        dead_payload: bytes | None = None,
    ) -> None:
        """Write a job's record with the ack (or nack) of the broker message it came in,
        in the same round trip and inside Dramatiq's loop that tries again until Redis
        answers; outside a worker, at once. Once a message went out nothing here needs
        Redis, so nothing can raise and lose what became of it."""
        self._record(
            self._status.pack(
                job_id,
                fields,
                accepted=accepted,
                event=event,
                dead_payload=dead_payload,
            )
        )

    def _record(self, packed: PackedWrite) -> None:
        message = CurrentMessage.get_current_message()
        if message is None:
            self._status.write_many([packed])
        else:
            attach_write(message, packed)

    def _dead(self, job: Job, reason: str, error: dict[str, Any]) -> NoReturn:
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
        )
        log.error(
            "job_dead_lettered",
            job_id=job.id,
            reason=reason,
            error=error.get("message"),
        )
        raise DeadLetterError(reason, str(error.get("message")))
