"""2. Bare peer: a Dramatiq actor sending a pre-made message over one reused smtplib
connection per thread. No validation, no status, no logs; the MIME bytes are built once."""

from __future__ import annotations

import smtplib
import threading
from email.message import EmailMessage

import dramatiq

from bench.common import (
    ENV_SMTP_HOST,
    ENV_SMTP_PORT,
    FROM_ADDRESS,
    HTML,
    SUBJECT,
    TEXT,
    TO_ADDRESS,
    env,
)
from bench.peers._dramatiq import QUEUE, broker

HOST, PORT = env(ENV_SMTP_HOST, "127.0.0.1"), int(env(ENV_SMTP_PORT))


def _premade() -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = FROM_ADDRESS, TO_ADDRESS, SUBJECT
    msg.set_content(TEXT)
    msg.add_alternative(HTML, subtype="html")
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


PREMADE = _premade()
_local = threading.local()


@dramatiq.actor(queue_name=QUEUE, actor_name="bare", max_retries=0)
def bare(to: str, **_job: object) -> None:
    """Send the pre-made bytes to ``to``, reconnecting once if the session was lost."""
    smtp = getattr(_local, "smtp", None)
    if smtp is None:
        smtp = _local.smtp = smtplib.SMTP(HOST, PORT)
    try:
        smtp.sendmail(FROM_ADDRESS, [to], PREMADE)
    except smtplib.SMTPServerDisconnected:
        smtp = _local.smtp = smtplib.SMTP(HOST, PORT)
        smtp.sendmail(FROM_ADDRESS, [to], PREMADE)


__all__ = ["PREMADE", "bare", "broker"]
