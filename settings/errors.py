"""The root of mailworker's error tree, and the tree itself.

Every error mailworker raises on purpose descends from ``MailworkerError``::

    MailworkerError
    ├── ConfigError(ValueError)        settings: names the key; never retried (CLI exit 2)
    ├── JobValidationError(ValueError) settings: names the field; dead-lettered at once
    ├── BrokerUnavailableError         settings: Redis unreachable or refusing (exit 4)
    │   ├── BrokerAuthenticationError  the login or an ACL refused
    │   └── BrokerNotReplicatedError   fewer replicas than [broker] wait_replicas had it
    ├── RequeueRefusedError            worker.deadletter: this dead letter cannot be sent
    ├── MalformedMessageError          worker.broker.envelope: a broker message of the
    │                                  wrong shape (also Dramatiq's DecodeError)
    ├── UnreadableMessageError         worker.inbound.parse: inbound mail past a limit or
    │                                  too malformed to read; .reason (classify catches it)
    └── DeliveryError                  worker.errors: .service, .code; no secrets
        ├── RecipientRefusedError      5xx to RCPT: those recipients, for good
        ├── MessageRefusedError        this service can't carry this message: next one
        ├── TransportUnavailableError  connect, TLS, AUTH, token: next service now;
        │                              .auth, .hold (a quota's breaker hold)
        ├── TransientDeliveryError     4xx, 429, HTTP 5xx, timeouts; .retry_after,
        │                              .in_doubt
        └── BudgetExhaustedError       a sending budget is spent; .wait

docs/design.md §5 says what each delivery class does to a job. Dramatiq's own
``ConnectionClosed`` and ``DecodeError`` are raised only to Dramatiq, which handles them.
The root lives here because the lowest room, ``settings``, imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "BrokerAuthenticationError",
    "BrokerNotReplicatedError",
    "BrokerUnavailableError",
    "ConfigError",
    "JobValidationError",
    "MailworkerError",
]


class MailworkerError(Exception):
    """Base class of every error mailworker raises on purpose."""


class ConfigError(MailworkerError, ValueError):
    """The configuration is invalid; ``field`` names the key at fault. Never retried.

    One error may carry several problems (``problems``: (field, message) pairs, the
    first one being ``field``'s); its text is then one line per problem.
    """

    def __init__(
        self, field: str, message: str, *, more: Sequence[tuple[str, str]] = ()
    ) -> None:
        self.field = field
        self.reason = message
        self.problems: list[tuple[str, str]] = [(field, message), *more]
        super().__init__("\n".join(f"{f}: {m}" if f else m for f, m in self.problems))

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (e.g. by a process pool) with the arguments it is built from.
        return _rebuild_config_error, (type(self), self.problems)


def _rebuild_config_error(
    cls: type[ConfigError], problems: list[tuple[str, str]]
) -> ConfigError:
    (field, message), *more = problems
    return cls(field, message, more=more)


class JobValidationError(MailworkerError, ValueError):
    """A notification is invalid; ``field`` names the part at fault, ``reason`` says why.

    Raised however a job is built (``Notification(...)``, ``model_validate``, JSON,
    ``parse_job``), never pydantic's own ``ValidationError``; it is a ``ValueError``.
    Never retried.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.reason = message
        super().__init__(f"{field}: {message}" if field else message)

    def __reduce__(self) -> tuple[type[JobValidationError], tuple[str, str]]:
        # Pickled (e.g. by a process pool) with the two arguments it is built from.
        return type(self), (self.field, self.reason)


class BrokerUnavailableError(MailworkerError):
    """The broker (Redis) cannot be reached or used; nothing was enqueued (CLI exit 4)."""


class BrokerAuthenticationError(BrokerUnavailableError):
    """The broker refused the login of ``broker_url`` (password or ACL user), or the ACL
    user may not run a command mailworker needs; nothing was enqueued (CLI exit 4)."""


class BrokerNotReplicatedError(BrokerUnavailableError):
    """The primary took the enqueue, but fewer replicas than ``[broker] wait_replicas``
    confirmed it within ``wait_timeout`` (CLI exit 4).

    The job may still be delivered, or be lost if the primary fails now. Enqueueing it
    again with the same ``idempotency_key`` is safe: it is not enqueued twice.
    """
