"""``mailworker dev``: an embedded broker, the worker and a capture mailbox, on loopback.

fakeredis and aiosmtpd are imported only when ``dev`` runs: other commands start faster.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from common.exits import settings_or_fail
from common.sockets import free_port
from settings import Settings

if TYPE_CHECKING:
    from worker.cli.dev_inbound import DevInbound

__all__ = ["CaptureMailbox", "EmbeddedBroker", "dev", "dev_settings"]

HOST = "127.0.0.1"
DEV_FROM = "noreply@mailworker.test"
RETURN_PATH = "bounces@mailworker.test"  # worker.cli.dev_inbound receives it
BOUNCING_DOMAIN = "unknown.mailworker.test"


class EmbeddedBroker:
    """fakeredis's TCP server on loopback: a Redis that serves Dramatiq (Lua via lupa)."""

    def __init__(self, port: int = 0) -> None:
        from fakeredis import TcpFakeServer

        self._server = TcpFakeServer((HOST, port), server_type="redis")
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fakeredis", daemon=True
        )

    @property
    def url(self) -> str:
        """The broker URL producers use."""
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()


class _Writer:
    """aiosmtpd handler: each message becomes ``outbox/<time>-<n>.eml``."""

    def __init__(self, outbox: Path, on_message: Callable[[Path], None]) -> None:
        self.outbox = outbox
        self.count = 0
        self._on_message = on_message
        self.inbound: DevInbound | None = None  # set once the worker is built

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Any, envelope: Any
    ) -> str:
        content = envelope.original_content or b""
        inbound = self.inbound
        if inbound is not None and inbound.is_inbound(envelope.rcpt_tos):
            loop = asyncio.get_running_loop()
            try:
                handled = await loop.run_in_executor(
                    None,
                    inbound.receive,
                    content,
                    envelope.mail_from,
                    envelope.rcpt_tos,
                )
            except Exception:
                return "451 4.3.0 cannot record the message now, try again later"
            if handled.failed:
                return f"554 5.6.0 not accepted: {' '.join(handled.reason.split())}"
            return f"250 2.0.0 {handled.kind} {handled.outcome}"
        self.count += 1
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{self.count:05d}.eml"
        path = self.outbox / name
        envelope_lines = (
            f"X-Envelope-From: <{envelope.mail_from}>\r\n"
            f"X-Envelope-To: {', '.join(envelope.rcpt_tos)}\r\n"
        ).encode()
        path.write_bytes(envelope_lines + content)
        self._on_message(path)
        if inbound is not None:
            inbound.bounce_later(content, envelope.mail_from, envelope.rcpt_tos)
        return "250 2.0.0 Captured"


class CaptureMailbox:
    """A loopback SMTP server that writes every message it receives into ``outbox``."""

    def __init__(
        self, outbox: Path, *, on_message: Callable[[Path], None] = lambda p: None
    ) -> None:
        outbox.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.writer = _Writer(outbox, on_message)
        from aiosmtpd.controller import Controller

        self._controller = Controller(self.writer, hostname=HOST, port=self.port)

    def start(self) -> None:
        """Serve in aiosmtpd's thread."""
        self._controller.start()

    def stop(self) -> None:
        """Stop serving."""
        self._controller.stop()
        asyncio.set_event_loop(None)


def dev_settings(base: Settings, *, broker_url: str, smtp_port: int) -> Settings:
    """The configuration ``dev`` runs with.

    It keeps the user's limits and retry policy, but has only the capture mailbox as a
    service and the embedded broker. Configured services and inbound sources are
    ignored. Bounces use dev's own return path, which the capture mailbox receives; with
    ``[email_actions]`` on, the capture mailbox receives its ``reply_address`` too, and
    action links (unless ``links_base_url`` is set) point at the API on loopback, at
    ``[api] listen``'s port.
    """
    data = base.model_dump(
        exclude={
            "smtp",
            "openauth",
            "integrated_services",
            "broker_url",
            "inbound",
            "bounces",
        }
    )
    data["broker_url"] = broker_url
    data["redirect_all_to"] = ""
    # Bounces come back to the capture mailbox: a signed return path of dev's own.
    data["bounces"] = {"return_path": RETURN_PATH, "secret": secrets.token_hex(16)}
    data["smtp"] = [
        {
            "name": "capture",
            "from_address": DEV_FROM,
            "from_display_name": "mailworker dev",
            "server": HOST,
            "port": smtp_port,
            "security": "none",
            "timeout": "5s",
        }
    ]
    if base.email_actions.enabled:
        data["inbound"] = [
            {
                "name": "dev",
                "kind": "smtp",
                "listen": f"{HOST}:{smtp_port}",
                "accept": [base.email_actions.reply_address],
            }
        ]
        if not base.email_actions.links_base_url:
            port = base.api.listen.rpartition(":")[2]
            data["email_actions"]["links_base_url"] = f"http://{HOST}:{port}"
    return Settings(**data)


@click.command()
@click.option(
    "--outbox",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("outbox"),
    show_default=True,
    help="Where captured messages are written as .eml files.",
)
@click.option("--threads", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    help="Port of the embedded broker (default: a free one).",
)
@click.option(
    "--api-port",
    type=click.IntRange(0, 65535),
    default=0,
    help="Port of the HTTP API on 127.0.0.1 (default: [api] listen's, 8025, when it is "
    "free, else a free one).",
)
def dev(outbox: Path, threads: int, port: int, api_port: int) -> None:
    """Run everything on loopback: an embedded broker, the worker, a capture mailbox.

    Configured services are ignored. Every message is written into OUTBOX and never
    sent anywhere. Prints the MAILWORKER_BROKER_URL for producers in another terminal,
    and the HTTP API's URL with a dev key (all scopes) and a curl to paste.
    """
    from dramatiq import Worker

    from common.broker import connect
    from worker.app import build
    from worker.cli.dev_inbound import DevInbound
    from worker.inbound.runner import build_inbound
    from worker.logging import configure

    base = _with_api_port(settings_or_fail(), api_port)
    broker = EmbeddedBroker(port)
    broker.start()
    import structlog

    log = structlog.get_logger("mailworker.dev")
    mailbox = CaptureMailbox(
        outbox, on_message=lambda p: log.info("message_captured", file=str(p))
    )
    mailbox.start()
    settings = dev_settings(base, broker_url=broker.url, smtp_port=mailbox.port)
    configure(
        log_format=settings.log_format, log_recipients=settings.log_recipients, dev=True
    )
    app = build(settings)
    client = connect(broker.url)
    mailbox.writer.inbound = DevInbound(
        build_inbound(settings, client),
        app.status,
        reply_address=settings.email_actions.reply_address
        if settings.email_actions.enabled
        else "",
    )
    app.broker.emit_after("process_boot")
    # Poll an idle queue every 50 ms so a message arrives well within a second.
    worker = Worker(app.broker, worker_threads=threads, worker_timeout=50)
    worker.start()
    api, api_key = _serve_api(
        settings, client, int(settings.api.listen.rpartition(":")[2])
    )
    me = (
        sys.argv[0]
        if shutil.which("mailworker") != os.path.abspath(sys.argv[0])
        else "mailworker"
    )
    click.echo(
        f"mailworker dev: broker {broker.url} (embedded), capture mailbox "
        f"127.0.0.1:{mailbox.port} -> {outbox.resolve()}/",
        err=True,
    )
    click.echo("In another terminal, paste:", err=True)
    click.echo(f"export MAILWORKER_BROKER_URL={broker.url}")
    click.echo(
        f"{shlex.quote(me)} send --to someone@example.com --subject 'Hello from mailworker' "
        "--text 'It works.'"
    )
    api_url = f"http://{HOST}:{api.port}"
    click.echo(
        f"# HTTP API: {api_url}/ (docs: {api_url}/openapi.json), dev key {api_key}"
    )
    click.echo(_curl(api_url, api_key))
    click.echo(
        f"# a recipient at {BOUNCING_DOMAIN} bounces: see it with `status`, "
        "`inbound list`, `suppress list`, `events tail`",
        err=True,
    )
    if settings.email_actions.enabled:
        click.echo(
            "# e-mail actions: replies to "
            f"{settings.email_actions.local_part}+<key>@{settings.email_actions.domain} "
            f"sent to 127.0.0.1:{mailbox.port} are handled (README, 'E-mail actions'); "
            f"action links go to {settings.email_actions.links_base_url}/a/...",
            err=True,
        )
    sys.stdout.flush()
    _wait_for_signal()
    click.echo("mailworker dev: stopping", err=True)
    api.stop()
    worker.stop(timeout=5000)
    app.close()
    mailbox.stop()
    broker.stop()


def _with_api_port(base: Settings, port: int) -> Settings:
    """``base`` with the API on 127.0.0.1: ``port``, or [api] listen's port if free."""
    if not port:
        wanted = int(base.api.listen.rpartition(":")[2])
        with socket.socket() as probe:
            try:
                probe.bind((HOST, wanted))
                port = wanted
            except OSError:
                port = free_port()  # another dev, or a real API, holds it
    api = base.api.model_copy(update={"listen": f"{HOST}:{port}"})
    return base.model_copy(update={"api": api})


def _serve_api(settings: Settings, client: Any, port: int) -> tuple[Any, str]:
    """The HTTP API on the embedded broker, in a thread, and a new key of every scope."""
    from worker.api.accesslog import AccessLog
    from worker.api.app import create_app
    from worker.api.keys import SCOPES, ApiKeys
    from worker.api.server import BackgroundServer

    _, secret = ApiKeys(client, settings.namespace).create(
        f"dev-{secrets.token_hex(3)}", SCOPES
    )
    server = BackgroundServer(
        AccessLog(create_app(settings, client=client)), settings, HOST, port
    )
    server.start()
    return server, secret


def _curl(url: str, key: str) -> str:
    body = '{"to": "someone@example.com", "subject": "Hello over HTTP", "text": "It works."}'
    return (
        f"curl -s {url}/v1/notifications -H {shlex.quote('Authorization: Bearer ' + key)} "
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
