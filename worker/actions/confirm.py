"""The short reply that tells the actor what became of their reply (``confirm_by_email``).

It is a notification like any other, enqueued for the worker (retries, failover), marked
``Auto-Submitted: auto-replied`` (RFC 3834) and threaded under the reply. Auto-replies,
bounces and list mail are never answered.
"""

from __future__ import annotations

import hashlib

import structlog

from producers.enqueue import Producer
from producers.job import Notification
from settings import BrokerUnavailableError, JobValidationError
from worker.actions.verdict import REASONS, Verdict
from worker.metrics.recorder import recorder

__all__ = ["Confirmations"]

log = structlog.get_logger("mailworker.actions")


def _text(verdict: Verdict, subject: str) -> tuple[str, str]:
    """The confirmation's subject and text."""
    if verdict.outcome == "accepted":
        return (
            f"Done: {verdict.action} – {subject}",
            f'Your reply was accepted: "{verdict.action}" on "{subject}".\n',
        )
    return (
        f"Not done – {subject}",
        f'Your reply to "{subject}" was not used: {REASONS[verdict.reason]}.\n'
        "Nothing was changed.\n",
    )


class Confirmations:
    """Enqueues confirmations through a producer on the workers' broker.

    Args:
        producer: the producer (the inbound process's own).
    """

    def __init__(self, producer: Producer) -> None:
        self._producer = producer

    def confirm(
        self,
        *,
        actor: str,
        verdict: Verdict,
        subject: str,
        reply_id: str | None,
        message_key: str,
        job_id: str | None,
    ) -> str | None:
        """Enqueue the confirmation of one handled reply; its job id, or None.

        None when nothing is sent: an auto-reply, no actor, or the broker refused (then
        it is logged: the reply's outcome stands without it).
        """
        if verdict.reason == "auto_reply" or not actor:
            return None
        title, text = _text(verdict, subject or "your task")
        headers = {"In-Reply-To": reply_id, "References": reply_id} if reply_id else {}
        digest = hashlib.sha256(message_key.encode()).hexdigest()
        try:
            notification = Notification(
                to=[actor],
                subject=title[:500],
                text=text,
                headers=headers,
                auto_submitted="auto-replied",
                idempotency_key=f"action-confirmation:{digest}",
                metadata={"confirms_job": job_id or ""},
            )
            confirmation = self._producer.enqueue(notification)
        except (JobValidationError, BrokerUnavailableError) as exc:
            log.warning(
                "action_confirmation_failed",
                error_type=type(exc).__name__,
                job_id=job_id,
            )
            return None
        recorder().enqueued(notification.priority, source="confirmation")
        return confirmation
