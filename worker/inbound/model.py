"""What a source hands over, what became of it, and the contract every source keeps."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from settings import MailworkerError

if TYPE_CHECKING:
    from worker.inbound.classify import Classification

__all__ = [
    "Handled",
    "InboundUnavailableError",
    "Kind",
    "Outcome",
    "Received",
    "Sink",
    "Source",
]

# What a message is: a reply that is an action (next wing), a bounce, an auto-reply, else.
Kind = Literal["action", "bounce", "auto_reply", "other"]
# What was done with it. `failed` messages go to `failed_folder` (or get a 5xx).
Outcome = Literal["bounced", "delayed", "ignored", "accepted", "refused", "failed"]


@dataclass(frozen=True, slots=True)
class Received:
    """One message as a source got it.

    Args:
        raw: the whole message, as bytes.
        source: the ``[[inbound]]`` source's name.
        mail_from: the envelope sender over SMTP/LMTP ("" for the null sender ``<>``),
            None where the source has no envelope (IMAP, Graph).
        rcpt_to: the envelope recipients over SMTP/LMTP.
    """

    raw: bytes
    source: str
    mail_from: str | None = None
    rcpt_to: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Handled:
    """What became of a message: recorded before the source is told it is done.

    ``duplicate`` is True when the message had been handled before (same key): nothing
    was done again, and the first outcome is returned.
    """

    key: str
    kind: Kind
    outcome: Outcome
    reason: str = ""
    job_id: str | None = None
    message_id: str | None = None
    duplicate: bool = False
    details: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        """True when the message goes to ``failed_folder`` (or is refused with a 5xx)."""
        return self.outcome == "failed"


class InboundUnavailableError(MailworkerError):
    """The outcome could not be recorded (Redis away): the source must try again later.

    The message must stay where it is (IMAP, Graph) or be answered 451 (SMTP).
    """


class Sink(Protocol):
    """Where sources hand messages: ``worker.inbound.handler.Inbound``."""

    def handle(
        self, received: Received, found: Classification | None = None
    ) -> Handled:
        """Record what ``received`` is and does, once; return the outcome.

        ``found`` is ``classify(received.raw)`` when the source has read it already.

        Raises:
            InboundUnavailableError: nothing was recorded; try again later.
        """
        ...


class Source(Protocol):
    """One running ``[[inbound]]`` source."""

    name: str

    def run(self, stop: threading.Event) -> None:
        """Receive until ``stop`` is set. Errors are logged and retried with backoff."""
        ...
