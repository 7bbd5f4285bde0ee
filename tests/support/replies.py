"""Replies to an action notification, written as mail clients write them."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import make_msgid

REPLY_DOMAIN = "workflow.example.com"
QUOTE_GMAIL = (
    "\n\nOn Tue, 1 Dec 2026 at 10:00, Example Notifications <noreply@example.com> "
    "wrote:\n> Invoice 42 waits for your approval.\n> -- \n> Reply to act on this.\n"
)
QUOTE_OUTLOOK = (
    "\n\n________________________________\n"
    "From: Example Notifications <noreply@example.com>\n"
    "Sent: Tuesday, December 1, 2026 10:00 AM\n"
    "To: Ann <ann@example.org>\n"
    "Subject: Approve invoice 42\n\n"
    "Invoice 42 waits for your approval.\n"
)


def key_address(key: str) -> str:
    """The address a notification's Reply-To gives for ``key``."""
    return f"actions+{key}@{REPLY_DOMAIN}"


def reply(
    key: str,
    *,
    sender: str = "Ann <ann@example.org>",
    subject: str = "Re: approve: Approve invoice 42",
    text: str | None = "Looks fine, pay it." + QUOTE_GMAIL,
    html: str | None = None,
    to: str | None = None,
    charset: str = "utf-8",
    headers: dict[str, str] | None = None,
) -> bytes:
    """A reply to ``key``'s address from ``sender``, CRLF line ends."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to or key_address(key)
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain="mail.example.org")
    message["Date"] = "Tue, 01 Dec 2026 10:05:00 +0000"
    for name, value in (headers or {}).items():
        message[name] = value
    if text is not None:
        message.set_content(text, charset=charset)
    if html is not None:
        if text is None:
            message.set_content(html, subtype="html", charset=charset)
        else:
            message.add_alternative(html, subtype="html", charset=charset)
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
