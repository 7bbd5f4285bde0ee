"""Transports: the only code that talks to mail services."""

from worker.transports.base import OutgoingMessage, Receipt, Transport

__all__ = ["OutgoingMessage", "Receipt", "Transport"]
