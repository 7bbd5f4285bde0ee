"""6. Naive peer (latency phase): a Dramatiq actor that builds the message with
``EmailMessage`` and opens a new smtplib connection for every message. The job's ``ref``
goes into the Message-ID so the sink can time each message."""

from __future__ import annotations

import smtplib

import dramatiq

from bench.common import ENV_SMTP_HOST, ENV_SMTP_PORT, env
from bench.peers._dramatiq import QUEUE, broker
from bench.peers.typical import build

HOST, PORT = env(ENV_SMTP_HOST, "127.0.0.1"), int(env(ENV_SMTP_PORT))


@dramatiq.actor(queue_name=QUEUE, actor_name="send_notification")
def send_notification(
    to: str, subject: str, text: str, html: str, ref: str, **_job: object
) -> None:
    """Build one notification and send it over a connection of its own."""
    msg = build(to, subject, text, html)
    msg["Message-ID"] = f"<{ref}@bench.example>"
    with smtplib.SMTP(HOST, PORT) as smtp:
        smtp.send_message(msg)


__all__ = ["broker", "send_notification"]
