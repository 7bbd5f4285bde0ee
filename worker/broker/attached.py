"""What a job leaves on its broker message for the consumer's ack or nack to apply.

The actor, the middleware and the consumer each hold the same ``MessageProxy``. This is
the one typed place where they leave work for each other. Everything here is applied
inside Dramatiq's ack loop, which tries again until Redis answers, so none of it is
lost when Redis is away.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dramatiq.broker import MessageProxy
from dramatiq.message import Message
from redis.typing import EncodableT

__all__ = ["Attached", "PackedWrite", "attached", "exception_of"]

# One status write as ``StatusStore.pack`` prepares it.
PackedWrite = list[EncodableT]

# The attribute of a MessageProxy that holds its ``Attached``.
_ATTRIBUTE = "_mailworker_attached"


@dataclass(slots=True)
class Attached:
    """The work a message carries until it is acknowledged.

    Attributes:
        writes: status writes, applied with the ack in one round trip.
        enqueues: messages to enqueue (with a delay in ms) before the ack: jobs of a
            bulk message put back as single jobs. The consumer drops each once made.
        retry: the delayed copy ``ReliableRetries`` wants enqueued, with its delay.
        dead: the (reason, error) ``DeadLetterCapture`` recorded, once it did.
    """

    writes: list[PackedWrite] = field(default_factory=list)
    enqueues: list[tuple[Message[Any], int]] = field(default_factory=list)
    retry: tuple[Message[Any], int] | None = None
    dead: tuple[str, str | None] | None = None


def attached(message: object) -> Attached:
    """The work attached to ``message``, made empty on first use."""
    found: Attached | None = vars(message).get(_ATTRIBUTE)
    if found is None:
        found = vars(message)[_ATTRIBUTE] = Attached()
    return found


def exception_of(message: MessageProxy) -> BaseException | None:
    """The exception the actor raised on its last run of ``message``, if any."""
    exc: BaseException | None = getattr(message, "_exception", None)
    return exc
