"""The delivery actor's body: validate, deliver, record the outcome, map it to the broker."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import dramatiq
import orjson
import structlog
from dramatiq.middleware import CurrentMessage

from producers.job import Notification, parse_job
from settings import JobValidationError, MailworkerError, Settings
from worker.delivery import Deliverer, Outcome
from worker.logging import show_address
from worker.status import JobStart, StatusStore

__all__ = ["DeadLetterError", "JobHandler"]

log = structlog.get_logger("mailworker.job")


class DeadLetterError(MailworkerError):
    """Raised to end a job in the dead-letter queue; ``reason`` is DESIGN §6's."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class JobHandler:
    """Runs one attempt of one job.

    Args:
        settings: the configuration.
        status: the status store.
        deliverer: the services in delivery order.
        broker: where a job waiting for a budget is put back.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        status: StatusStore,
        deliverer: Deliverer,
        broker: dramatiq.Broker,
    ) -> None:
        self._broker = broker
        self._settings = settings
        self._status = status
        self._deliverer = deliverer

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        """The actor: every outcome is a status record; failures raise for the broker.

        A job that dies is kept in our dead letters (with its record) and then acknowledged.

        Raises:
            dramatiq.Retry: the job is tried again later, with the delay it carries.
        """
        try:
            self._handle(args, kwargs)
        except DeadLetterError:
            return

    def _handle(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        message = CurrentMessage.get_current_message()
        assert message is not None, "the CurrentMessage middleware is required"
        job_id = message.message_id
        attempt = int(message.options.get("retries", 0)) + 1
        queue = message.queue_name.removesuffix(".DQ")
        try:
            notification = self._validate(args, kwargs)
        except JobValidationError as exc:
            self._dead(
                job_id,
                attempt,
                "validation",
                {
                    "type": "validation",
                    "field": exc.field,
                    "message": str(exc),
                    "code": None,
                    "service": None,
                },
            )
        age = time.time() - message.message_timestamp / 1000
        if (
            notification.not_after is not None
            and notification.not_after <= datetime.now(UTC)
        ):
            self._dead(
                job_id, attempt, "expired", _error("expired", "not_after has passed")
            )
        if age > self._settings.retry.max_age:
            self._dead(
                job_id, attempt, "max_age", _error("max_age", f"job is {age:.0f}s old")
            )
        start = self._status.begin(
            job_id,
            attempt=attempt,
            queue=queue,
            metadata=notification.metadata,
            redis_id=str(message.options.get("redis_message_id", "")),
        )
        limit = self._settings.retry.redelivery_limit
        if start.redeliveries >= limit:
            self._dead(
                job_id,
                attempt,
                "redelivery_limit",
                _error(
                    "redelivery_limit", f"its worker died {start.redeliveries} times"
                ),
            )
        if start.in_doubt(attempt):
            # The last process died between sending and recording: a server may have it.
            log.warning("delivery_in_doubt", redeliveries=start.redeliveries)
        self._attempt(job_id, attempt, age, notification, start)

    def _validate(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Notification:
        if args or set(kwargs) != {"job"}:
            raise JobValidationError(
                "kwargs", "expected exactly one keyword argument, 'job'"
            )
        notification = parse_job(kwargs["job"])
        limits = self._settings.limits
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

    def _attempt(
        self,
        job_id: str,
        attempt: int,
        age: float,
        notification: Notification,
        start: JobStart,
    ) -> None:
        redirect = self._settings.redirect_all_to
        wanted = [redirect] if redirect else notification.recipients
        pending = [
            r for r in wanted if r not in start.accepted and r not in start.refused
        ]
        headers = (
            {"X-Mailworker-Redirected-From": ", ".join(notification.recipients)}
            if redirect
            else None
        )
        outcome = (
            Outcome()
            if not pending
            else self._deliverer.deliver(
                job_id, notification, pending, extra_headers=headers
            )
        )
        recipients = _merge(start, wanted, outcome)
        fields: dict[str, Any] = {"recipients": recipients, "skipped": outcome.skipped}
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
            if any(r["state"] == "accepted" for r in recipients):
                fields.update(state="sent", reason="", error=None, next_attempt_at="")
                self._status.write(
                    job_id,
                    fields,
                    accepted=accepted,
                    event=_event(attempt, "sent", outcome),
                )
                return
            fields["error"] = error or _error(
                "permanent", "every recipient was refused"
            )
            self._status.write(job_id, fields, accepted=accepted)
            self._dead(job_id, attempt, "permanent", fields["error"])
        if outcome.only_waiting:
            self._wait(job_id, attempt, age, outcome, fields)
            return
        fields["error"] = error or _deferred_error(outcome)
        self._retry(job_id, attempt, age, outcome, fields, accepted)

    def _wait(
        self,
        job_id: str,
        attempt: int,
        age: float,
        outcome: Outcome,
        fields: dict[str, Any],
    ) -> None:
        """Every service is spent or cooling down: come back later; not an attempt."""
        delay = max(1.0, outcome.wait or 0.0)
        reason = outcome.skipped[-1]["reason"] if outcome.skipped else "budget"
        if age + delay > self._settings.retry.max_age:
            self._status.write(job_id, fields)
            self._dead(
                job_id, attempt, "max_age", _error(reason, "waited past retry.max_age")
            )
        message = CurrentMessage.get_current_message()
        assert message is not None
        next_at = (datetime.now(UTC) + timedelta(seconds=delay)).isoformat(
            timespec="seconds"
        )
        # Re-enqueue ourselves with the same options, so the retry count stays as it is;
        # if that fails the actor raises and the broker retries: nothing is lost.
        self._broker.enqueue(message.copy(), delay=int(delay * 1000))
        fields.update(
            state="retrying", reason=reason, next_attempt_at=next_at, error=None
        )
        self._status.write(
            job_id,
            fields,
            event={"attempt": attempt, "event": "waiting", "reason": reason},
        )
        log.info("job_waiting", reason=reason, delay_s=round(delay, 1))

    def _retry(
        self,
        job_id: str,
        attempt: int,
        age: float,
        outcome: Outcome,
        fields: dict[str, Any],
        accepted: list[str],
    ) -> None:
        policy = self._settings.retry
        if attempt >= policy.max_attempts:
            self._status.write(job_id, fields, accepted=accepted)
            self._dead(job_id, attempt, "retries_exhausted", fields["error"])
        base = min(policy.max_backoff, policy.min_backoff * 2 ** (attempt - 1))
        delay = max(
            policy.min_backoff,
            random.uniform(base / 2, base),
            outcome.retry_after or 0.0,
        )
        if age + delay > policy.max_age:
            self._status.write(job_id, fields, accepted=accepted)
            self._dead(job_id, attempt, "max_age", fields["error"])
        next_at = (datetime.now(UTC) + timedelta(seconds=delay)).isoformat(
            timespec="seconds"
        )
        fields.update(
            state="retrying", reason="retry_scheduled", next_attempt_at=next_at
        )
        self._status.write(
            job_id,
            fields,
            accepted=accepted,
            event={**_event(attempt, "retrying", outcome), "error": fields["error"]},
        )
        log.warning(
            "job_retry_scheduled",
            delay_s=round(delay, 1),
            error=fields["error"]["message"],
        )
        raise dramatiq.Retry(
            message=fields["error"]["message"], delay=int(delay * 1000)
        )

    def _dead(
        self, job_id: str, attempt: int, reason: str, error: dict[str, Any]
    ) -> NoReturn:
        self._status.write(
            job_id,
            {
                "state": "dead",
                "reason": reason,
                "error": error,
                "attempts": attempt,
                "next_attempt_at": "",
                "dead_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            },
            event={
                "attempt": attempt,
                "event": "dead",
                "reason": reason,
                "error": error,
            },
            dead_payload=_current_payload(),
        )
        log.error("job_dead_lettered", reason=reason, error=error.get("message"))
        raise DeadLetterError(reason, str(error.get("message")))


def _current_payload() -> bytes:
    """The message being processed, as requeue needs it (without Dramatiq's traceback)."""
    message = CurrentMessage.get_current_message()
    assert message is not None
    data = message.asdict()
    data["options"] = {k: v for k, v in data["options"].items() if k != "traceback"}
    return orjson.dumps(data)


def _deferred_error(outcome: Outcome) -> dict[str, Any]:
    """The error of an attempt whose server deferred some recipients (4xx to RCPT)."""
    deferred = outcome.receipt.deferred
    if not deferred:
        return _error("transient", "no service took the message")
    code, text = next(iter(deferred.values()))
    return {
        "type": "transient",
        "code": code,
        "service": outcome.service,
        "message": f"{len(deferred)} recipient(s) deferred: {text}",
    }


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": kind, "code": None, "service": None, "message": message}


def _event(attempt: int, event: str, outcome: Outcome) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "attempt": attempt,
        "event": event,
        "service": outcome.service,
    }
    if outcome.skipped:
        entry["skipped"] = outcome.skipped
    return entry


def _merge(
    start: JobStart, wanted: list[str], outcome: Outcome
) -> list[dict[str, Any]]:
    """Per-recipient outcomes so far: earlier ones, then this attempt's."""
    previous = {r["address"]: r for r in start.recipients}
    receipt = outcome.receipt
    merged = []
    for address in wanted:
        if address in start.accepted or address in receipt.accepted:
            entry = previous.get(address) if address in start.accepted else None
            merged.append(
                entry
                or {
                    "address": address,
                    "state": "accepted",
                    "code": 250,
                    "message": receipt.response,
                }
            )
        elif address in receipt.refused or address in receipt.deferred:
            state = "refused" if address in receipt.refused else "deferred"
            code, text = receipt.refused.get(address) or receipt.deferred[address]
            merged.append(
                {"address": address, "state": state, "code": code, "message": text}
            )
        elif address in previous:
            merged.append(previous[address])
        else:
            merged.append(
                {"address": address, "state": "deferred", "code": None, "message": ""}
            )
    return merged
