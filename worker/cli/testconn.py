"""``mailworker test-connection``: a real test message through one service, step by step."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from producers.job import Mailbox, Notification
from settings import OpenAuthService, Settings, SmtpConnection, read_secret
from worker.errors import DeliveryError
from worker.mime import render
from worker.transports.base import OutgoingMessage
from worker.transports.graph import GraphTransport
from worker.transports.oauth import HttpClient, TokenProvider
from worker.transports.smtp import OUTLOOK_SCOPE
from worker.transports.smtp_client import SmtpClient

__all__ = ["ConnectionReport", "describe", "probe", "services_to_test"]

Echo = Callable[[str], None]
_SMTP_STEPS = ("connect", "tls", "auth", "send")
_GRAPH_STEPS = ("token", "send")


@dataclass
class ConnectionReport:
    """Each step's verdict for one service, and the cause when one failed."""

    service: str
    steps: list[tuple[str, bool, str]] = field(default_factory=list)
    cause: str | None = None
    echo: Echo | None = None

    @property
    def ok(self) -> bool:
        """True when the test message was accepted."""
        return self.cause is None

    def note(self, step: str, detail: str, *, ok: bool = True) -> None:
        """Record one step's verdict (and print it at once when echoing)."""
        self.steps.append((step, ok, detail))
        if self.echo:
            self.echo(f"  {step:<8} {'ok' if ok else 'FAILED':<7} {detail}")

    def failed(self, order: tuple[str, ...], exc: Exception) -> None:
        """The first step not yet passed failed with ``exc``."""
        done = {step for step, _, _ in self.steps}
        step = next((s for s in order if s not in done), order[-1])
        cause = (
            str(exc)
            if isinstance(exc, DeliveryError)
            else f"{type(exc).__name__}: {exc}"
        )
        self.cause = cause
        self.note(step, cause, ok=False)

    @property
    def verdict(self) -> str:
        """The last line printed for the service."""
        result = "ok: test message accepted" if self.ok else f"FAILED: {self.cause}"
        return f"  verdict  {result}"


def _test_message(service: str, to: str) -> Notification:
    return Notification(
        to=[to],
        subject=f"mailworker test message ({service})",
        text=f"A test message from mailworker through the service '{service}'.\n",
    )


def _tokens(settings: Settings, name: str) -> TokenProvider:
    svc = settings.integrated_services[name]
    http = HttpClient(verify=str(svc.ca_bundle) if svc.ca_bundle else True, timeout=30)
    return TokenProvider(name, svc, http)


def _token_step(
    report: ConnectionReport, tokens: TokenProvider, scopes: list[str], service: str
) -> None:
    token = tokens.acquire(scopes, service=service)
    left = max(0, int(token.expires_on - time.time()))
    report.note(
        "token",
        f"tenant {tokens.service.tenant_id}, app {tokens.service.client_id}, "
        f"scope {' '.join(scopes)}, expires in {left // 60} min",
    )


def probe_smtp(
    settings: Settings, conn: SmtpConnection, to: str, report: ConnectionReport
) -> None:
    """Connect, secure, authenticate (password or XOAUTH2) and send one test message."""
    # A secret file that cannot be read is a configuration error (exit 2), not a verdict.
    password = read_secret(
        conn.password, conn.password_file, f"smtp[{conn.name}].password_file"
    )
    tokens = (
        _tokens(settings, conn.integrated_service)
        if conn.effective_auth == "xoauth2"
        else None
    )
    order = ("token", *_SMTP_STEPS) if tokens else _SMTP_STEPS

    def token() -> str:
        assert tokens is not None
        return tokens.acquire([OUTLOOK_SCOPE], service=conn.name).access_token

    client = SmtpClient(
        conn, password.get_secret_value() if password else None, oauth_token=token
    )
    try:
        if tokens is not None:
            _token_step(report, tokens, [OUTLOOK_SCOPE], conn.name)
        client.open(report.note)
        notification = _test_message(conn.name, to)
        data = render(
            notification,
            job_id=f"test-{uuid.uuid4()}",
            from_box=Mailbox(address=conn.from_address, name=conn.from_display_name),
        )
        receipt = client.send(conn.from_address, (notification.recipients[0],), data)
        if not receipt.accepted:
            code, text = next(iter({**receipt.refused, **receipt.deferred}.values()))
            raise DeliveryError(
                f"recipient {to} refused: {text}", service=conn.name, code=code
            )
        report.note("send", f"MAIL/RCPT/DATA: {receipt.response}")
    except Exception as exc:  # every failure is the verdict's cause
        report.failed(order, exc)
    finally:
        client.close()


def probe_graph(
    settings: Settings, oa: OpenAuthService, to: str, report: ConnectionReport
) -> None:
    """Acquire a token for the service account and send one test message through Graph."""
    svc = settings.integrated_services[oa.service]
    tokens = _tokens(settings, oa.service)
    tokens._credential()  # unreadable secret files: a configuration error (exit 2)
    http = HttpClient(
        verify=str(svc.ca_bundle) if svc.ca_bundle else True, timeout=oa.timeout
    )
    transport = GraphTransport(
        oa, graph_endpoint=svc.graph_endpoint, tokens=tokens, http=http
    )
    try:
        _token_step(report, tokens, transport.scopes, oa.name)
        notification = _test_message(oa.name, to)
        message = OutgoingMessage(
            job_id=f"test-{uuid.uuid4()}",
            sender=oa.service_identity,
            recipients=(notification.recipients[0],),
            data=b"",
            notification=notification,
        )
        receipt = transport.send(message)
        report.note("send", f"sendMail as {oa.service_identity}: {receipt.response}")
    except Exception as exc:  # every failure is the verdict's cause
        report.failed(_GRAPH_STEPS, exc)
    finally:
        transport.close()


Testable = OpenAuthService | SmtpConnection


def describe(service: Testable) -> str:
    """The heading printed before a service's steps."""
    if isinstance(service, OpenAuthService):
        return f"openauth {service.name} (Graph sendMail as {service.service_identity})"
    return (
        f"smtp {service.name} ({service.server}:{service.effective_port}, "
        f"security {service.effective_security}, auth {service.effective_auth})"
    )


def probe(
    settings: Settings, service: Testable, to: str, *, echo: Echo | None = None
) -> ConnectionReport:
    """Send one test message through ``service``.

    A failed step is the verdict.

    Raises:
        ConfigError: a secret file cannot be read.
    """
    report = ConnectionReport(service.name, echo=echo)
    if isinstance(service, OpenAuthService):
        probe_graph(settings, service, to, report)
    else:
        probe_smtp(settings, service, to, report)
    return report


def services_to_test(settings: Settings, name: str | None) -> list[Testable]:
    """The named service, or every enabled one in delivery order."""
    every: list[Testable] = [*settings.openauth, *settings.smtp]
    if name is not None:
        return [s for s in every if s.name == name]
    return [s for s in every if s.enabled]
