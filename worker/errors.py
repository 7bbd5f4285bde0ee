"""The delivery errors: one class per row of docs/design.md §5.

The whole error tree is drawn in ``settings/errors.py``. The transport that raises
decides the class. Nothing outside ``worker.transports`` catches a library's own
exceptions.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from settings.errors import (
    BrokerUnavailableError,
    ConfigError,
    JobValidationError,
    MailworkerError,
)

if TYPE_CHECKING:
    from worker.records import ErrorRecord

__all__ = [
    "BrokerUnavailableError",
    "BudgetExhaustedError",
    "ConfigError",
    "DeliveryError",
    "JobValidationError",
    "MailworkerError",
    "MessageRefusedError",
    "RecipientRefusedError",
    "TransientDeliveryError",
    "TransportUnavailableError",
]


class DeliveryError(MailworkerError):
    """A delivery through one service failed.

    Attributes:
        service: the configured service name.
        code: the SMTP reply code or HTTP status, when there was one.
        kind: the docs/design.md §5 class, as written in status records.
        retry_after: seconds the far end asked us to wait (transient errors).
        in_doubt: the message may have been delivered (transient errors).
        auth: the service refused its credentials (unavailable errors).
        hold: seconds the circuit breaker stays open at once (unavailable errors).
    """

    kind = "delivery"
    # The subclass that carries a field sets it. The others keep these defaults.
    retry_after: float | None = None
    in_doubt: bool = False
    auth: bool = False
    hold: float | None = None

    def __init__(self, message: str, *, service: str, code: int | None = None) -> None:
        super().__init__(message)
        self.service = service
        self.code = code

    def as_record(self) -> ErrorRecord:
        """The ``error`` object of a status record (docs/design.md §6)."""
        return {
            "type": self.kind,
            "code": self.code,
            "service": self.service,
            "message": str(self),
        }


class RecipientRefusedError(DeliveryError):
    """Every remaining recipient was refused for good (SMTP 5xx to RCPT)."""

    kind = "recipient_refused"


class MessageRefusedError(DeliveryError):
    """This service cannot carry this message (size, sender, content): try the next."""

    kind = "message_refused"


class TransportUnavailableError(DeliveryError):
    """The service cannot be used now (connect, TLS, AUTH): try the next at once.

    ``auth``: its credentials were refused (AUTH 535, a token request refused for the
    client, Graph 401/403). Nothing will go through it until someone mends them.
    ``hold``: the transport knows the service stays closed this long (a quota), so
    the circuit breaker opens at once for that many seconds.
    """

    kind = "unavailable"

    def __init__(
        self,
        message: str,
        *,
        service: str,
        code: int | None = None,
        auth: bool = False,
        hold: float | None = None,
    ) -> None:
        super().__init__(message, service=service, code=code)
        self.auth = auth
        self.hold = hold


class TransientDeliveryError(DeliveryError):
    """A failure worth retrying (4xx, timeouts). ``retry_after`` in seconds, if the far end said.

    ``in_doubt``: the whole message was sent and the server's verdict was lost (the
    connection dropped or timed out after the final dot, RFC 5321 6.1): it may have been
    delivered, and a retry may deliver it twice.
    """

    kind = "transient"

    def __init__(
        self,
        message: str,
        *,
        service: str,
        code: int | None = None,
        retry_after: float | None = None,
        in_doubt: bool = False,
    ) -> None:
        super().__init__(message, service=service, code=code)
        self.retry_after = retry_after
        self.in_doubt = in_doubt


class BudgetExhaustedError(DeliveryError):
    """A sending budget of the service is spent.

    It has room again in ``wait`` seconds. This is not a failure of the service. It never
    counts toward the circuit breaker, and waiting for it is not an attempt. ``overflow``
    is the service's ``failover`` or ``wait``.
    """

    kind = "budget"

    def __init__(
        self, message: str, *, service: str, wait: float, overflow: str
    ) -> None:
        super().__init__(message, service=service)
        self.wait = wait
        self.overflow = overflow

    @classmethod
    def spent(
        cls, limit: str, owner: str, wait: float, *, service: str, overflow: str
    ) -> BudgetExhaustedError:
        """The error for budget ``limit`` of ``owner`` (a mailbox, a connection) spent.

        ``wait`` is ``inf`` when the message alone is larger than the budget.
        """
        message = (
            f"the message alone is over {limit} of {owner}"
            if math.isinf(wait)
            else f"{limit} of {owner} spent; room in {math.ceil(wait)}s"
        )
        return cls(
            message,
            service=service,
            wait=wait,
            overflow=overflow,
        )
