"""``mailworker dev``: an embedded broker, the worker and a capture mailbox, on loopback."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from fakeredis import TcpFakeServer

from common.sockets import free_port
from settings import Settings

__all__ = ["CaptureMailbox", "EmbeddedBroker", "dev_settings"]

HOST = "127.0.0.1"
DEV_FROM = "noreply@mailworker.test"


class EmbeddedBroker:
    """fakeredis's TCP server on loopback: a Redis that serves Dramatiq (Lua via lupa)."""

    def __init__(self, port: int = 0) -> None:
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

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Any, envelope: Any
    ) -> str:
        self.count += 1
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{self.count:05d}.eml"
        path = self.outbox / name
        envelope_lines = (
            f"X-Envelope-From: <{envelope.mail_from}>\r\n"
            f"X-Envelope-To: {', '.join(envelope.rcpt_tos)}\r\n"
        ).encode()
        path.write_bytes(envelope_lines + (envelope.original_content or b""))
        self._on_message(path)
        return "250 2.0.0 Captured"


class CaptureMailbox:
    """A loopback SMTP server that writes every message it receives into ``outbox``."""

    def __init__(
        self, outbox: Path, *, on_message: Callable[[Path], None] = lambda p: None
    ) -> None:
        outbox.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.writer = _Writer(outbox, on_message)
        self._controller = Controller(self.writer, hostname=HOST, port=self.port)

    def start(self) -> None:
        """Serve in aiosmtpd's thread."""
        self._controller.start()

    def stop(self) -> None:
        """Stop serving."""
        self._controller.stop()
        asyncio.set_event_loop(None)


def dev_settings(base: Settings, *, broker_url: str, smtp_port: int) -> Settings:
    """The configuration ``dev`` runs with: the user's limits and retry policy, but only the
    capture mailbox as a service and the embedded broker (configured services are ignored)."""
    data = base.model_dump(
        exclude={"smtp", "openauth", "integrated_services", "broker_url"}
    )
    data["broker_url"] = broker_url
    data["redirect_all_to"] = ""
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
    return Settings(**data)
