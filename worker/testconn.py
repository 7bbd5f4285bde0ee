"""``mailworker test-connection``: a real test message through one service, step by step."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from producers.job import Mailbox, Notification
from settings import Settings, SmtpConnection, read_secret
from worker.errors import DeliveryError
from worker.message import render
from worker.transports.smtp_client import SmtpClient

__all__ = ["ConnectionReport", "probe_smtp"]

_STEPS = ("connect", "tls", "auth", "send")


@dataclass
class ConnectionReport:
    """Each step's verdict for one service, and the cause when one failed."""

    service: str
    target: str
    steps: list[tuple[str, bool, str]] = field(default_factory=list)
    cause: str | None = None

    @property
    def ok(self) -> bool:
        """True when the test message was accepted."""
        return self.cause is None

    def lines(self) -> list[str]:
        """The report as printed by the CLI."""
        out = [f"{self.service} ({self.target})"]
        out += [
            f"  {step:<8} {'ok' if ok else 'FAILED':<7} {detail}"
            for step, ok, detail in self.steps
        ]
        out.append(
            f"  verdict  {'ok: test message accepted' if self.ok else 'FAILED: ' + str(self.cause)}"
        )
        return out


def probe_smtp(
    conn: SmtpConnection, to: str, *, echo: Callable[[str], None] | None = None
) -> ConnectionReport:
    """Connect, secure, authenticate and send one test message to ``to``.

    Args:
        conn: the SMTP connection to test.
        to: the recipient of the test message.
        echo: called with each step's line as it completes (progress on a terminal).

    Returns:
        The report; a failed step is its verdict, not an exception.

    Raises:
        ConfigError: the password file cannot be read.
    """
    security = conn.effective_security
    report = ConnectionReport(
        f"smtp {conn.name}", f"{conn.server}:{conn.effective_port}, security {security}"
    )

    def note(step: str, detail: str) -> None:
        report.steps.append((step, True, detail))
        if echo:
            echo(f"  {step:<8} {'ok':<7} {detail}")

    # A secret file that cannot be read is a configuration error (exit 2), not a verdict.
    password = read_secret(
        conn.password, conn.password_file, f"smtp[{conn.name}].password_file"
    )
    client = None
    try:
        client = SmtpClient(conn, password.get_secret_value() if password else None)
        client.open(note)
        job_id = f"test-{uuid.uuid4()}"
        notification = Notification(
            to=[to],
            subject=f"mailworker test message ({conn.name})",
            text=f"A test message from mailworker through SMTP connection '{conn.name}'.\n",
        )
        data = render(
            notification,
            job_id=job_id,
            from_box=Mailbox(address=conn.from_address, name=conn.from_display_name),
        )
        receipt = client.send(conn.from_address, (notification.recipients[0],), data)
        if not receipt.accepted:
            code, text = next(iter({**receipt.refused, **receipt.deferred}.values()))
            raise DeliveryError(
                f"recipient {to} refused: {text}", service=conn.name, code=code
            )
        note("send", f"MAIL/RCPT/DATA: {receipt.response}")
    except Exception as exc:
        done = {step for step, _, _ in report.steps}
        failed = next((s for s in _STEPS if s not in done), "send")
        cause = (
            str(exc)
            if isinstance(exc, DeliveryError)
            else f"{exc.__class__.__name__}: {exc}"
        )
        report.steps.append((failed, False, cause))
        report.cause = cause
        if echo:
            echo(f"  {failed:<8} {'FAILED':<7} {cause}")
    finally:
        if client is not None:
            client.close()
    return report


def services_to_test(settings: Settings, name: str | None) -> list[SmtpConnection]:
    """The named service, or every enabled one in delivery order."""
    if name is not None:
        return [c for c in settings.smtp if c.name == name]
    return [c for c in settings.smtp if c.enabled]
