"""3a. Typical Dramatiq peer: builds the message with ``EmailMessage`` and sends it over a
reused smtplib connection, as users write such an actor."""

from __future__ import annotations

import dramatiq

from bench.peers._dramatiq import QUEUE, broker
from bench.peers.typical import build, send_reused


@dramatiq.actor(queue_name=QUEUE, actor_name="send_notification")
def send_notification(
    to: str, subject: str, text: str, html: str, **_job: object
) -> None:
    """Build and send one notification."""
    send_reused(build(to, subject, text, html))


__all__ = ["broker", "send_notification"]
