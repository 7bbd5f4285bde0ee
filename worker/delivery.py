"""Deliver one notification: sender order, in-process retries (tenacity) and failover."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
from settings import JobValidationError, RetryPolicy
from worker.errors import (
    BudgetExhaustedError,
    DeliveryError,
    MessageRefusedError,
    RecipientRefusedError,
    TransientDeliveryError,
)
from worker.limits import Breaker
from worker.mime import Mime, message_id, render_body, render_message

if TYPE_CHECKING:
    from worker.inbound.returnpath import ReturnPath
    from worker.records import SkipRecord
from worker.transports.base import (
    BatchTransport,
    OutgoingMessage,
    Receipt,
    SendResult,
    Transport,
)

__all__ = ["Deliverer", "Outcome", "Parcel", "Service"]

log = structlog.get_logger("mailworker.delivery")


@dataclass(slots=True)
class Parcel:
    """One job to deliver.

    It holds the id, the notification, the recipients still to send to, and headers to
    add (``redirect_all_to``).
    """

    job_id: str
    notification: Notification
    recipients: tuple[str, ...]
    extra_headers: dict[str, str] | None = None
    # E-mail actions: each recipient's own notification (its key), sent on its own.
    personal: dict[str, Notification] | None = None
    _body: Mime | None = None

    def split(self) -> list[Parcel]:
        """One parcel per recipient, each with its own notification."""
        assert self.personal is not None
        return [
            Parcel(self.job_id, self.personal[r], (r,), self.extra_headers)
            for r in self.recipients
        ]

    def body(self) -> Mime:
        """The MIME body, written once for every service that needs it."""
        if self._body is None:
            self._body = render_body(self.notification)
        return self._body


@dataclass(frozen=True, slots=True)
class Service:
    """A transport with the From it sends as."""

    transport: Transport
    from_box: Mailbox
    # SMTP with [bounces] return_path: the signed per-job envelope sender.
    return_path: ReturnPath | None = None

    @property
    def name(self) -> str:
        """The configured service name."""
        return self.transport.name

    def sender(self, job_id: str) -> str:
        """The envelope sender (MAIL FROM) for ``job_id``."""
        if self.return_path is None:
            return self.from_box.address
        return self.return_path.address(job_id)


@dataclass(slots=True)
class Outcome:
    """What one attempt achieved, across every service it tried."""

    service: str | None = None
    message_id: str | None = None
    receipt: Receipt = field(default_factory=Receipt)
    skipped: list[SkipRecord] = field(default_factory=list)
    last_error: DeliveryError | None = None
    retry_after: float | None = None
    retryable: bool = False
    wait: float | None = None  # a budget or breaker to wait for: not an attempt
    # {service, reason} of each try whose reply to the final dot was lost (RFC 5321
    # 6.1). The server may have the message, and a retry may deliver it twice.
    in_doubt: list[dict[str, str]] = field(default_factory=list)

    def add(self, other: Outcome) -> None:
        """Take in the outcome of another message of the same job (one per recipient).

        Each recipient's state is its own; the job waits or retries when any did.
        """
        if other.service and other.receipt.accepted:
            self.service, self.message_id = other.service, other.message_id
        self.receipt.accepted += other.receipt.accepted
        self.receipt.refused.update(other.receipt.refused)
        self.receipt.deferred.update(other.receipt.deferred)
        self.receipt.response = other.receipt.response or self.receipt.response
        self.skipped += other.skipped
        self.last_error = other.last_error or self.last_error
        if other.retry_after is not None:
            self.retry_after = max(self.retry_after or 0.0, other.retry_after)
        self.retryable = self.retryable or other.retryable
        if other.wait is not None:
            self.wait = min(self.wait or other.wait, other.wait)
        self.in_doubt += other.in_doubt

    def note_in_doubt(self, error: DeliveryError, job_id: str) -> None:
        """Record a try of job ``job_id`` that ended in doubt
        (``TransientDeliveryError.in_doubt``)."""
        if error.in_doubt:
            reason = str(error)
            self.in_doubt.append({"service": error.service, "reason": reason})
            log.warning(
                "delivery_in_doubt", job_id=job_id, service=error.service, reason=reason
            )

    @property
    def only_waiting(self) -> bool:
        """True when no service was tried for real: each was spent or cooling down."""
        return self.service is None and not self.retryable and self.wait is not None

    @property
    def finished(self) -> bool:
        """True when no recipient is left to try again."""
        return not self.receipt.deferred and not self.retryable and self.wait is None


def _retry_after(error: BaseException | None) -> float | None:
    """The wait the far end asked for, when the error says."""
    return error.retry_after if isinstance(error, DeliveryError) else None


def _too_long(error: BaseException | None, limit: float) -> bool:
    """The far end asked for a longer wait than we may sleep in-process."""
    wait = _retry_after(error)
    return wait is not None and wait > limit


def _backoff(error: BaseException | None, attempt: int, base: float) -> float:
    """The wait before the next try: the far end's Retry-After, else doubling from ``base``."""
    wait = _retry_after(error)
    return float(wait) if wait is not None else float(base * 2 ** (attempt - 1))


class _RetryAfterTooLong(stop_base):
    """Stop in-process retries when the far end asks for a longer wait than we may sleep."""

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def __call__(self, retry_state: RetryCallState) -> bool:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        return _too_long(error, self.limit)


class Deliverer:
    """Tries services in order until one takes the message (docs/design.md §5).

    Args:
        services: enabled services in delivery order.
        retry: the ``[retry]`` settings (``transport_retries``, ``max_in_process_wait``).
        backoff: first in-process wait in seconds. It doubles per retry.
        sleep: how to wait (injectable so tests need not wait).
        breaker: the shared circuit breaker, or None to turn it off.
    """

    def __init__(
        self,
        services: Sequence[Service],
        *,
        retry: RetryPolicy,
        backoff: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        breaker: Breaker | None = None,
    ) -> None:
        self.services = list(services)
        self._retry = retry
        self._backoff = backoff
        self._sleep = sleep
        self._breaker = breaker
        # Services whose credentials were refused, said once at error level each.
        self._refused: set[str] = set()
        # Decided once: a runtime protocol check is too slow to repeat for every job.
        self._batch: dict[str, BatchTransport] = {
            s.name: s.transport
            for s in self.services
            if isinstance(s.transport, BatchTransport)
        }
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

    def deliver_many(
        self, parcels: Sequence[Parcel], *, stop: Callable[[], bool] | None = None
    ) -> list[Outcome | None]:
        """``deliver`` for many jobs.

        Some first services can send many at once (SMTP). The first try of every job
        with such a service is one pipelined run on one session per service. What follows
        (in-process retries, failover) is ``deliver``'s, job by job.

        Args:
            parcels: the jobs.
            stop: checked between messages. Once true, nothing more is sent.

        Returns:
            Per job its outcome, or None when it was not tried because of ``stop``.

        Raises:
            JobValidationError: a ``sender`` names no enabled service.
        """
        firsts: list[SendResult] = [None] * len(parcels)
        groups: dict[int, list[int]] = {}
        for index, parcel in enumerate(parcels):
            service = self.order(parcel.notification)[0]
            if service.name not in self._batch or parcel.personal is not None:
                continue
            if self._breaker is not None and not self._breaker.allow(service.name):
                continue
            groups.setdefault(self.services.index(service), []).append(index)
        for position, indexes in groups.items():
            service = self.services[position]
            try:
                messages = [self._message(service, parcels[i]) for i in indexes]
                sent = self._batch[service.name].send_many(messages, stop=stop)
            except Exception as exc:  # a bug: the other services' results are kept
                log.error(
                    "bulk_send_failed_unexpectedly",
                    service=service.name,
                    error_type=type(exc).__name__,
                    exc_info=True,
                )
                continue  # its jobs are tried one by one below
            for index, result in zip(indexes, sent, strict=True):
                firsts[index] = result
        stopping = stop or (lambda: False)
        return [
            None if first is None and stopping() else self._guarded(parcel, first)
            for parcel, first in zip(parcels, firsts, strict=True)
        ]

    def deliver(
        self,
        job_id: str,
        notification: Notification,
        recipients: Sequence[str],
        *,
        extra_headers: dict[str, str] | None = None,
        personal: dict[str, Notification] | None = None,
    ) -> Outcome:
        """Send to ``recipients`` through the first service that takes the message.

        With ``personal`` (e-mail actions) each recipient gets its own notification, in
        a message of its own.

        Returns:
            The outcome. It is ``retryable`` when every service failed for a passing
            reason.

        Raises:
            JobValidationError: ``sender`` names no enabled service.
        """
        return self._guarded(
            Parcel(job_id, notification, tuple(recipients), extra_headers, personal)
        )

    def _guarded(self, parcel: Parcel, first: SendResult = None) -> Outcome:
        """``_guarded_one``, for each recipient on its own when they have their own."""
        if parcel.personal is None:
            return self._guarded_one(parcel, first)
        outcome = Outcome()
        for one in parcel.split():
            outcome.add(self._guarded_one(one))
        return outcome

    def _guarded_one(self, parcel: Parcel, first: SendResult = None) -> Outcome:
        """``_deliver``, which never raises once a message may have gone out.

        An unexpected error (a bug, Redis away under a transport's own bookkeeping) is a
        passing failure of the attempt. What a server accepted before it is kept.
        """
        try:
            return self._deliver(parcel, first=first)
        except JobValidationError:
            raise  # raised by ``order`` before anything is sent
        except Exception as exc:
            log.error(
                "delivery_failed_unexpectedly",
                error_type=type(exc).__name__,
                exc_info=True,
            )
            service = self.order(parcel.notification)[0]
            outcome = Outcome()
            if isinstance(first, Receipt) and first.accepted:
                outcome.service = service.name
                outcome.message_id = message_id(parcel.job_id, service.from_box.address)
                outcome.receipt = first
                return outcome
            outcome.retryable = True
            outcome.last_error = TransientDeliveryError(
                f"unexpected error: {type(exc).__name__}: {exc}"[:300],
                service=service.name,
            )
            return outcome

    def _deliver(self, parcel: Parcel, *, first: SendResult = None) -> Outcome:
        """``deliver``, given the first try when ``deliver_many`` already made it.

        ``first`` is the result of the first service's first try.
        """
        outcome = Outcome()
        services = self.order(parcel.notification)
        for index, service in enumerate(services):
            last = index == len(services) - 1
            tried = first if index == 0 else None
            if (
                tried is None
                and self._breaker is not None
                and not self._breaker.allow(service.name)
            ):
                self._note_skip(
                    outcome, service.name, "breaker_open", "circuit breaker open"
                )
                outcome.wait = min(
                    outcome.wait or self._breaker.cooldown, self._breaker.cooldown
                )
                continue
            try:
                receipt = self._send_with_retries(service, parcel, outcome, tried)
            except RecipientRefusedError as exc:
                outcome.last_error = exc
                outcome.receipt.refused = {
                    r: (exc.code or 550, str(exc)) for r in parcel.recipients
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
            if self._refused and service.name in self._refused:
                self._refused.discard(service.name)
                log.warning("service_authenticated", service=service.name)
            outcome.service = service.name
            outcome.message_id = message_id(parcel.job_id, service.from_box.address)
            outcome.receipt = receipt
            outcome.retryable = False
            outcome.wait = None
            return outcome
        return outcome

    @staticmethod
    def _message(service: Service, parcel: Parcel) -> OutgoingMessage:
        data: bytes | Mime = b""
        if service.transport.needs_mime:
            data = render_message(
                parcel.notification,
                job_id=parcel.job_id,
                from_box=service.from_box,
                body=parcel.body(),
                extra_headers=parcel.extra_headers,
            )
        return OutgoingMessage(
            job_id=parcel.job_id,
            sender=service.sender(parcel.job_id),
            recipients=parcel.recipients,
            data=data,
            notification=parcel.notification,
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
                self._breaker.failure(service.name, hold=exc.hold)
        if isinstance(exc, TransientDeliveryError) and exc.retry_after is not None:
            outcome.retry_after = max(outcome.retry_after or 0.0, exc.retry_after)
        if exc.auth and service.name not in self._refused:
            self._refused.add(service.name)
            log.error(
                "service_cannot_authenticate",
                service=service.name,
                code=exc.code,
                error=str(exc),
                note="every job it takes fails until its credentials are mended",
            )
        log.warning(
            "transport_failed_over" if not last else "transport_failed",
            service=service.name,
            error_type=exc.kind,
            code=exc.code,
            error=str(exc),
        )

    def _send_with_retries(
        self,
        service: Service,
        parcel: Parcel,
        outcome: Outcome,
        first: SendResult = None,
    ) -> Receipt:
        def send(message: OutgoingMessage) -> Receipt:
            try:
                return service.transport.send(message)
            except TransientDeliveryError as exc:
                outcome.note_in_doubt(exc, parcel.job_id)
                raise

        # The first try goes straight through (or was made by deliver_many): tenacity
        # costs ~5 % of a job's CPU and is only needed once a transient failure happened.
        try:
            if first is None:
                return send(self._message(service, parcel))
            if isinstance(first, DeliveryError):
                outcome.note_in_doubt(first, parcel.job_id)
                raise first
            return first
        except TransientDeliveryError as exc:
            policy = self._retry
            if policy.transport_retries == 0 or _too_long(
                exc, policy.max_in_process_wait
            ):
                raise
            self._sleep(_backoff(exc, 1, self._backoff))
        message = self._message(service, parcel)
        receipt: Receipt = self._retrying(send, message)
        return receipt

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        return _backoff(error, state.attempt_number, self._backoff)
