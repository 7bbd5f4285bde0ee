"""The one small interface every transport implements, and what it takes and returns."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from producers.job import Notification
from worker.errors import DeliveryError
from worker.mime import Mime

__all__ = ["BatchTransport", "OutgoingMessage", "Receipt", "SendResult", "Transport"]


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message for one service: envelope, rendered MIME and the job it came from.

    Attributes:
        job_id: the job (and Message-ID) it belongs to.
        sender: the envelope sender (MAIL FROM).
        recipients: envelope recipients still to be sent to.
        data: the whole MIME message, CRLF line ends (``Mime``: attachments encoded
            as it is written).
        notification: the validated job, for transports that send structured data.
    """

    job_id: str
    sender: str
    recipients: tuple[str, ...]
    data: bytes | Mime
    notification: Notification


@dataclass(slots=True)
class Receipt:
    """What a server said about each recipient of one message.

    Attributes:
        accepted: recipients the server took responsibility for.
        refused: recipient → (code, text), refused for good (5xx).
        deferred: recipient → (code, text), refused for now (4xx).
        response: the server's final reply to the message, for logs.
    """

    accepted: list[str] = field(default_factory=list)
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)
    deferred: dict[str, tuple[int, str]] = field(default_factory=dict)
    response: str = ""


# What became of one message sent among many: its Receipt, its own error, or None when
# it was not sent at all.
SendResult = Receipt | DeliveryError | None


class Transport(Protocol):
    """A configured service that can send a message. Called from worker threads."""

    name: str
    # Whether ``OutgoingMessage.data`` must be the rendered MIME message.
    needs_mime: bool

    def send(self, message: OutgoingMessage) -> Receipt:
        """Send ``message``.

        Raise a ``DeliveryError`` subclass when the message as a whole failed. Return a
        Receipt when the server answered per recipient.
        """
        ...

    def close(self) -> None:
        """Close pooled connections."""
        ...


@runtime_checkable
class BatchTransport(Transport, Protocol):
    """A transport that can also send many messages in one run (SMTP pipelining)."""

    def send_many(
        self,
        messages: Sequence[OutgoingMessage],
        *,
        stop: Callable[[], bool] | None = None,
    ) -> list[SendResult]:
        """Send ``messages`` in order, checking ``stop`` before each one.

        Returns:
            Per message, its Receipt, the DeliveryError ``send`` would have raised, or
            None when it was not sent because of ``stop``.
        """
        ...
