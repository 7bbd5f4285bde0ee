"""The test SMTP server's handler and credentials: aiosmtpd records and answers as told."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP as SmtpProtocol  # noqa: N811 - aiosmtpd names it SMTP
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from tests.support.env import HOST

USER, PASSWORD = "mailer", "s3cret-smtp-pw"


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    at: float = field(default_factory=time.time)  # when the final dot was answered


@dataclass
class Recorder:
    """An aiosmtpd handler that records messages; tests change its replies."""

    messages: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address → reply
    data_replies: list[str] = field(default_factory=list)  # popped per message
    commands: list[str] = field(default_factory=list)
    # advertise RFC 2920 (aiosmtpd reads pipelined commands fine)
    pipelining: bool = True
    ehlos: int = 0  # EHLO count: one per session (two with STARTTLS)
    # address → event: RCPT for it is answered only once the test sets the event
    holds: dict[str, threading.Event] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)  # addresses being held now

    async def handle_EHLO(
        self,
        server: SmtpProtocol,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        self.ehlos += 1
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self,
        server: SmtpProtocol,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        self.commands.append(f"MAIL {address}")
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SmtpProtocol,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        self.commands.append(f"RCPT {address}")
        hold = self.holds.get(address)
        if hold is not None:
            self.held.add(address)
            for _ in range(3000):  # at most 30 s: a forgotten hold fails, never hangs
                if hold.is_set():
                    break
                await asyncio.sleep(0.01)
            self.held.discard(address)
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(
        self, server: SmtpProtocol, session: Session, envelope: Envelope
    ) -> str:
        if self.data_replies:
            return self.data_replies.pop(0)
        content = envelope.original_content or b""
        self.messages.append(
            Received(envelope.mail_from or "", list(envelope.rcpt_tos), content)
        )
        return "250 2.0.0 Queued"


def authenticator(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == USER.encode()
        and auth_data.password == PASSWORD.encode()
    )
    # handled=False on failure, or aiosmtpd sends no reply and the client hangs.
    return AuthResult(success=True) if ok else AuthResult(success=False, handled=False)


@dataclass
class SmtpServer:
    port: int
    mode: str
    recorder: Recorder
    auth: bool

    def smtp_section(self, name: str = "primary", **overrides: Any) -> dict[str, Any]:
        """An [[smtp]] table pointing at this server."""
        section: dict[str, Any] = {
            "name": name,
            "from_address": "noreply@example.com",
            "from_display_name": "Example Notifications",
            "server": "localhost" if self.mode != "plain" else HOST,
            "port": self.port,
            "security": {"plain": "none", "starttls": "starttls", "tls": "tls"}[
                self.mode
            ],
            "timeout": "5s",
        }
        if self.auth:
            section.update(username=USER, password=PASSWORD)
        section.update(overrides)
        return section
