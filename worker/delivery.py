"""Deliver one notification: sender order, in-process retries (tenacity) and failover."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_any,
)
from tenacity.stop import stop_base

from producers.job import Mailbox, Notification
from settings import JobValidationError, Retry
from worker.errors import (
    BudgetExhaustedError,
    DeliveryError,
    MessageRefusedError,
    RecipientRefusedError,
    TransientDeliveryError,
)
from worker.limits import Breaker
from worker.message import message_id, render, render_body
from worker.transports.base import OutgoingMessage, Receipt, Transport

__all__ = ["Deliverer", "Outcome", "Service"]

log = structlog.get_logger("mailworker.delivery")


@dataclass(frozen=True, slots=True)
class Service:
    """A transport with the From it sends as."""

    transport: Transport
    from_box: Mailbox

    @property
    def name(self) -> str:
        """The configured service name."""
        return self.transport.name


@dataclass(slots=True)
class Outcome:
    """What one attempt achieved, across every service it tried."""

    service: str | None = None
    message_id: str | None = None
    receipt: Receipt = field(default_factory=Receipt)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    last_error: DeliveryError | None = None
    retry_after: float | None = None
    retryable: bool = False
    wait: float | None = None  # a budget or breaker to wait for: not an attempt

    @property
    def only_waiting(self) -> bool:
        """True when no service was tried for real: each was spent or cooling down."""
        return self.service is None and not self.retryable and self.wait is not None

    @property
    def finished(self) -> bool:
        """True when no recipient is left to try again."""
        return not self.receipt.deferred and not self.retryable and self.wait is None


def _too_long(error: BaseException | None, limit: float) -> bool:
    """The far end asked for a longer wait than we may sleep in-process."""
    wait = getattr(error, "retry_after", None)
    return wait is not None and wait > limit


def _backoff(error: BaseException | None, attempt: int, base: float) -> float:
    """The wait before the next try: the far end's Retry-After, else doubling from ``base``."""
    wait = getattr(error, "retry_after", None)
    return float(wait) if wait is not None else float(base * 2 ** (attempt - 1))


class _RetryAfterTooLong(stop_base):
    """Stop in-process retries when the far end asks for a longer wait than we may sleep."""

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def __call__(self, retry_state: RetryCallState) -> bool:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        return _too_long(error, self.limit)


class Deliverer:
    """Tries services in order until one takes the message (DESIGN §5).

    Args:
        services: enabled services in delivery order.
        retry: the ``[retry]`` settings (``transport_retries``, ``max_in_process_wait``).
        backoff: first in-process wait in seconds; doubles per retry.
        sleep: how to wait (injectable so tests need not wait).
        breaker: the shared circuit breaker; None turns it off.
    """

    def __init__(
        self,
        services: Sequence[Service],
        *,
        retry: Retry,
        backoff: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        breaker: Breaker | None = None,
    ) -> None:
        self.services = list(services)
        self._retry = retry
        self._backoff = backoff
        self._sleep = sleep
        self._breaker = breaker
        # Shared by all threads: tenacity keeps each call's state in thread-local storage.
        self._retrying = Retrying(
            retry=retry_if_exception_type(TransientDeliveryError),
            stop=stop_any(
                stop_after_attempt(retry.transport_retries),
                _RetryAfterTooLong(retry.max_in_process_wait),
            ),
            wait=self._wait,
            sleep=sleep,
            reraise=True,
        )

    def order(self, notification: Notification) -> list[Service]:
        """The services to try: all in order, or only the pinned ``sender``.

        Raises:
            JobValidationError: ``sender`` names no enabled service.
        """
        if notification.sender is None:
            return self.services
        pinned = [s for s in self.services if s.name == notification.sender]
        if not pinned:
            raise JobValidationError(
                "sender", f"no enabled service named {notification.sender!r}"
            )
        return pinned

    def deliver(
        self,
        job_id: str,
        notification: Notification,
        recipients: Sequence[str],
        *,
        extra_headers: dict[str, str] | None = None,
    ) -> Outcome:
        """Send to ``recipients`` through the first service that takes the message.

        Returns:
            The outcome; ``retryable`` when every service failed for a passing reason.

        Raises:
            JobValidationError: ``sender`` names no enabled service.
        """
        outcome = Outcome()
        services = self.order(notification)
        body = render_body(notification)
        for index, service in enumerate(services):
            last = index == len(services) - 1
            if self._breaker is not None and not self._breaker.allow(service.name):
                self._note_skip(
                    outcome, service.name, "breaker_open", "circuit breaker open"
                )
                outcome.wait = min(
                    outcome.wait or self._breaker.cooldown, self._breaker.cooldown
                )
                continue
            message = self._message(
                service, job_id, notification, recipients, body, extra_headers
            )
            try:
                receipt = self._send_with_retries(service, message)
            except RecipientRefusedError as exc:
                outcome.last_error = exc
                outcome.receipt.refused = {
                    r: (exc.code or 550, str(exc)) for r in recipients
                }
                outcome.retryable = False
                return outcome
            except BudgetExhaustedError as exc:
                self._note_skip(outcome, service.name, "budget", str(exc))
                outcome.wait = min(outcome.wait or exc.wait, exc.wait)
                if exc.overflow == "wait":
                    return outcome
                continue
            except DeliveryError as exc:
                self._skip(outcome, service, exc, last=last)
                continue
            if self._breaker is not None:
                self._breaker.success(service.name)
            outcome.service = service.name
            outcome.message_id = message_id(job_id, service.from_box.address)
            outcome.receipt = receipt
            outcome.retryable = False
            outcome.wait = None
            return outcome
        return outcome

    @staticmethod
    def _message(
        service: Service,
        job_id: str,
        notification: Notification,
        recipients: Sequence[str],
        body: bytes,
        extra_headers: dict[str, str] | None,
    ) -> OutgoingMessage:
        data = b""
        if getattr(service.transport, "needs_mime", True):
            data = render(
                notification,
                job_id=job_id,
                from_box=service.from_box,
                body=body,
                extra_headers=extra_headers,
            )
        return OutgoingMessage(
            job_id=job_id,
            sender=service.from_box.address,
            recipients=tuple(recipients),
            data=data,
            notification=notification,
        )

    @staticmethod
    def _note_skip(outcome: Outcome, service: str, reason: str, message: str) -> None:
        outcome.skipped.append(
            {"service": service, "reason": reason, "message": message}
        )
        log.info("transport_skipped", service=service, reason=reason)

    def _skip(
        self, outcome: Outcome, service: Service, exc: DeliveryError, *, last: bool
    ) -> None:
        outcome.last_error = exc
        outcome.skipped.append(
            {"service": service.name, "reason": exc.kind, "message": str(exc)}
        )
        if not isinstance(exc, MessageRefusedError):
            outcome.retryable = True
            if self._breaker is not None:
                self._breaker.failure(service.name, hold=_quota_hold(exc))
        if isinstance(exc, TransientDeliveryError) and exc.retry_after is not None:
            outcome.retry_after = max(outcome.retry_after or 0.0, exc.retry_after)
        log.warning(
            "transport_failed_over" if not last else "transport_failed",
            service=service.name,
            error_type=exc.kind,
            code=exc.code,
            error=str(exc),
        )

    def _send_with_retries(self, service: Service, message: OutgoingMessage) -> Receipt:
        # The first try goes straight through: tenacity costs ~5 % of a job's CPU and is
        # only needed once a transient failure happened.
        try:
            return service.transport.send(message)
        except TransientDeliveryError as exc:
            policy = self._retry
            if policy.transport_retries == 0 or _too_long(
                exc, policy.max_in_process_wait
            ):
                raise
            self._sleep(_backoff(exc, 1, self._backoff))
        receipt: Receipt = self._retrying(service.transport.send, message)
        return receipt

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        return _backoff(error, state.attempt_number, self._backoff)


# A quota error holds the breaker open this long (Exchange's daily quota is a sliding 24 h;
# a probe every hour finds out when it has cleared).
QUOTA_HOLD = 3600.0


def _quota_hold(exc: DeliveryError) -> float | None:
    text = str(exc)
    if exc.code == 554 and ("5.2.0" in text or "Quota" in text):
        return QUOTA_HOLD
    return None
