"""Transports: the only code that talks to mail services."""

from worker.transports.base import (
    BatchTransport,
    OutgoingMessage,
    Receipt,
    SendResult,
    Transport,
)

__all__ = ["BatchTransport", "OutgoingMessage", "Receipt", "SendResult", "Transport"]
