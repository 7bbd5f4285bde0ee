"""``mailworker dev`` receives too: bounces for a made-up domain, and mail for the return path.

A message to ``anyone@unknown.mailworker.test`` is captured like any other, and then
bounced the way a receiving server would: a DSN (RFC 3464) to the job's signed return
path, handed to the inbound handler once the job is recorded sent. Mail the capture
mailbox gets for the return path itself (``bounces+…@mailworker.test``) goes to the
handler too, so a bounce can be seen end to end with no mail server.
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime
from email.utils import format_datetime, parseaddr

import structlog

from worker.cli.dev import BOUNCING_DOMAIN
from worker.inbound.handler import Inbound
from worker.inbound.model import Handled, InboundUnavailableError, Received
from worker.status import StatusStore

__all__ = ["DevInbound"]

log = structlog.get_logger("mailworker.dev")


class DevInbound:
    """What the capture mailbox does besides writing ``.eml`` files.

    Args:
        inbound: the handler, on the embedded broker.
        status: the status store, to wait for a job's record before bouncing it.
        reply_address: ``email_actions.reply_address`` ("" when actions are off):
            replies to its keys go to the handler too.
    """

    def __init__(
        self, inbound: Inbound, status: StatusStore, *, reply_address: str = ""
    ) -> None:
        self._inbound = inbound
        self._status = status
        local, _, domain = reply_address.lower().partition("@")
        self._prefixes = [("bounces+", "@mailworker.test")]
        if reply_address:
            self._prefixes.append((f"{local}+", f"@{domain}"))

    def is_inbound(self, rcpt_tos: list[str]) -> bool:
        """Whether a message is for the return path or an action key, not a
        notification to capture."""
        return bool(rcpt_tos) and all(
            any(
                address.lower().startswith(start) and address.lower().endswith(end)
                for start, end in self._prefixes
            )
            for address in rcpt_tos
        )

    def receive(self, raw: bytes, mail_from: str, rcpt_tos: list[str]) -> Handled:
        """Hand a message for the return path to the handler."""
        received = Received(
            raw=raw, source="dev", mail_from=mail_from, rcpt_to=tuple(rcpt_tos)
        )
        return self._inbound.handle(received)

    def bounce_later(self, raw: bytes, mail_from: str, rcpt_tos: list[str]) -> None:
        """Bounce the recipients at ``BOUNCING_DOMAIN``, once the job is recorded."""
        gone = [a for a in rcpt_tos if a.lower().endswith("@" + BOUNCING_DOMAIN)]
        if not gone or not mail_from:
            return
        threading.Thread(
            target=self._bounce, args=(raw, mail_from, gone), daemon=True
        ).start()

    def _bounce(self, raw: bytes, mail_from: str, gone: list[str]) -> None:
        headers = raw.split(b"\r\n\r\n", 1)[0].decode("ascii", "replace")
        message_id = _header(headers, "Message-ID")
        job_id = message_id.strip("<>").rpartition("@")[0]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            record = self._status.get(job_id)
            if record is not None and record["state"] == "sent":
                break
            time.sleep(0.1)
        message = _dsn(to=mail_from, original_headers=headers, recipients=gone)
        try:
            handled = self.receive(message, "", [mail_from])
        except InboundUnavailableError as exc:
            log.warning("dev_bounce_not_recorded", error=str(exc))
            return
        log.info("dev_bounced", job_id=job_id, outcome=handled.outcome, to=gone)


def _header(headers: str, name: str) -> str:
    for line in headers.split("\r\n"):
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == name.lower():
            return value.strip()
    return ""


def _dsn(*, to: str, original_headers: str, recipients: list[str]) -> bytes:
    """A delivery status notification for ``recipients``, as a receiving MTA writes it."""
    boundary = f"dsn-{uuid.uuid4().hex}"
    blocks = "".join(
        f"Final-Recipient: rfc822; {address}\r\n"
        "Action: failed\r\n"
        "Status: 5.1.1\r\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{address}>: no such user here "
        "(mailworker dev)\r\n\r\n"
        for address in recipients
    )
    parts = [
        "From: Mail Delivery System <MAILER-DAEMON@mailworker.test>",
        f"To: {parseaddr(to)[1]}",
        "Subject: Undelivered Mail Returned to Sender",
        f"Message-ID: <{uuid.uuid4().hex}@mailworker.test>",
        f"Date: {format_datetime(datetime.now(UTC))}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;"
        f' boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        "Your message could not be delivered to: " + ", ".join(recipients),
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        "Reporting-MTA: dns; mailworker.test",
        "",
        blocks.rstrip("\r\n"),
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
        original_headers,
        "",
        f"--{boundary}--",
        "",
    ]
    return "\r\n".join(parts).encode()
