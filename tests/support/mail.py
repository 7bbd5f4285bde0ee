"""Inbound test messages written by hand: DSNs and replies, the way MTAs and people send them."""

from __future__ import annotations

import uuid


def dsn(
    *,
    to: str,
    original_message_id: str,
    recipient: str,
    status: str = "5.1.1",
    action: str = "failed",
    diagnostic: str = "smtp; 550 5.1.1 <{recipient}>: Recipient address rejected: User unknown",
    message_id: str | None = None,
) -> bytes:
    """A Postfix-style RFC 3464 delivery status notification, CRLF line ends."""
    boundary = f"b-{uuid.uuid4().hex}"
    message_id = message_id or f"<{uuid.uuid4().hex}@mx.example.org>"
    text = f"""\
From: MAILER-DAEMON@mx.example.org (Mail Delivery System)
To: {to}
Subject: Undelivered Mail Returned to Sender
Message-ID: {message_id}
Date: Tue, 01 Dec 2026 10:00:00 +0000
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
 boundary="{boundary}"

--{boundary}
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.example.org.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

--{boundary}
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org
X-Postfix-Queue-ID: 4F1C21A2B3
Arrival-Date: Tue, 01 Dec 2026 09:59:58 +0000

Final-Recipient: rfc822; {recipient}
Original-Recipient: rfc822;{recipient}
Action: {action}
Status: {status}
Diagnostic-Code: {diagnostic.format(recipient=recipient)}

--{boundary}
Content-Type: text/rfc822-headers

From: Example Notifications <noreply@example.com>
To: {recipient}
Subject: Task assigned
Message-ID: {original_message_id}

--{boundary}--
"""
    return text.replace("\n", "\r\n").encode()


def reply(*, to: str, in_reply_to: str, body: str = "APPROVE\n\nThanks, Bob") -> bytes:
    """A person's plain-text reply to one of our messages."""
    text = f"""\
From: Bob Example <bob@example.org>
To: {to}
Subject: Re: Task assigned
Message-ID: <{uuid.uuid4().hex}@mail.example.org>
In-Reply-To: {in_reply_to}
References: {in_reply_to}
Date: Tue, 01 Dec 2026 10:05:00 +0000
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8

{body}

On Tue, 1 Dec 2026 at 10:00, Example Notifications <noreply@example.com> wrote:
> You have a new task.
"""
    return text.replace("\n", "\r\n").encode()
