"""The message as users typically write it: ``email.message.EmailMessage``, text with an
html alternative, sent with ``send_message`` over a thread-local reused connection.

Shared by the typical Dramatiq peer and the typical Celery peer (the same code in both).
"""

from __future__ import annotations

import smtplib
import threading
from email.message import EmailMessage

from bench.common import ENV_SMTP_HOST, ENV_SMTP_PORT, FROM_ADDRESS, env

HOST, PORT = env(ENV_SMTP_HOST, "127.0.0.1"), int(env(ENV_SMTP_PORT))
_local = threading.local()


def build(to: str, subject: str, text: str, html: str) -> EmailMessage:
    """The notification as an ``EmailMessage``."""
    msg = EmailMessage()
    msg["From"] = FROM_ADDRESS
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    return msg


def send_reused(msg: EmailMessage) -> None:
    """``send_message`` over this thread's connection; one reconnect if it was lost."""
    smtp = getattr(_local, "smtp", None)
    if smtp is None:
        smtp = _local.smtp = smtplib.SMTP(HOST, PORT)
    try:
        smtp.send_message(msg)
    except smtplib.SMTPServerDisconnected:
        smtp = _local.smtp = smtplib.SMTP(HOST, PORT)
        smtp.send_message(msg)


__all__ = ["build", "send_reused"]
