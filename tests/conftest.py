"""Real servers for the tests: Redis (the machine's, else fakeredis), aiosmtpd SMTP
servers with trustme certificates and AUTH, and real Dramatiq workers."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SmtpProtocol  # noqa: N811 - aiosmtpd names it SMTP
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from dramatiq import Worker

from common.sockets import free_port
from settings import Settings, load_settings

HOST = "127.0.0.1"
USER, PASSWORD = "mailer", "s3cret-smtp-pw"
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REDIS_URL = "redis://127.0.0.1:6379/0"


# ---------------------------------------------------------------- Redis


def _real_redis() -> redis.Redis | None:
    from common.broker import connect

    client = connect(REDIS_URL)  # as the worker and producers connect
    try:
        client.ping()
    except redis.RedisError:
        if CI:
            raise RuntimeError(
                "CI=true but no Redis answers on 127.0.0.1:6379: .ci/run must start one"
            ) from None
        return None
    return client


_REAL = _real_redis()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The URL of the real Redis; tests that need a URL skip without one (never under CI)."""
    if _REAL is None:
        pytest.skip("no Redis on 127.0.0.1:6379")
    return REDIS_URL


@pytest.fixture
def redis_client() -> redis.Redis:
    """The real Redis where it answers, else an in-process fakeredis with Lua."""
    if _REAL is not None:
        return _REAL
    import fakeredis

    return fakeredis.FakeRedis()


@pytest.fixture
def namespace(redis_client: redis.Redis) -> Iterator[str]:
    """A key prefix of this test's own, removed afterwards: the shared server is never flushed."""
    ns = f"mwtest-{uuid.uuid4().hex[:12]}"
    yield ns
    keys = list(redis_client.scan_iter(match=f"{ns}:*", count=1000))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Any]:
    """A redis-server of this test's own (AOF on), for tests that stop or restart Redis:
    the machine's shared server on 6379 is never touched."""
    from tests.support.processes import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", HOST).configure_cert(context)
    return context


# ---------------------------------------------------------------- SMTP


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class Recorder:
    """An aiosmtpd handler that records messages; tests change its replies."""

    messages: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address → reply
    data_replies: list[str] = field(default_factory=list)  # popped per message
    commands: list[str] = field(default_factory=list)
    pipelining: bool = (
        True  # advertise RFC 2920 (aiosmtpd reads pipelined commands fine)
    )
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


def _authenticator(
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


@pytest.fixture
def smtp_server(server_tls: ssl.SSLContext) -> Iterator[Callable[..., SmtpServer]]:
    """Start aiosmtpd servers: ``smtp_server(mode="plain|starttls|tls", auth=False)``."""
    logging.getLogger("mail.log").setLevel(logging.CRITICAL)
    controllers: list[Controller] = []

    def start(
        mode: str = "plain", *, auth: bool = False, recorder: Recorder | None = None
    ) -> SmtpServer:
        recorder = recorder or Recorder()
        port = free_port()
        kwargs: dict[str, Any] = {"hostname": HOST, "port": port}
        if auth:
            kwargs.update(authenticator=_authenticator, auth_required=True)
        if mode == "starttls":
            kwargs.update(tls_context=server_tls, require_starttls=True)
        elif mode == "tls":
            # aiosmtpd does not know an implicit-TLS socket is secure (aiosmtpd#281).
            kwargs.update(ssl_context=server_tls, auth_require_tls=False)
            kwargs.pop("auth_required", None)
        elif auth:
            kwargs.update(auth_require_tls=False)
        controller = Controller(recorder, **kwargs)
        controller.start()
        controllers.append(controller)
        return SmtpServer(port=port, mode=mode, recorder=recorder, auth=auth)

    yield start
    for controller in controllers:
        controller.stop()


@pytest.fixture
def connect(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Any]]:
    """``connect(server)``: an open ``SmtpClient`` session to one of ``smtp_server``'s
    servers, closed at the end."""
    from worker.transports.smtp_client import SmtpClient

    clients: list[SmtpClient] = []

    def open_client(server: SmtpServer) -> SmtpClient:
        conn = make_settings(smtp=[server.smtp_section()]).smtp[0]
        client = SmtpClient(conn, None)
        client.open()
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.close()


# ---------------------------------------------------------------- Microsoft stand-in


@pytest.fixture
def fake_microsoft(server_tls: ssl.SSLContext) -> Iterator[Any]:
    """A stand-in Entra ID token endpoint and Graph sendMail over HTTPS on loopback."""
    from tests.support.fake_microsoft import FakeMicrosoft

    fake = FakeMicrosoft(server_tls)
    fake.start()
    yield fake
    fake.stop()
    assert not fake.errors  # exceptions the server swallowed


# ---------------------------------------------------------------- settings and workers


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    lines: list[str] = []
    tables: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict) and key != "integrated_services":
            tables.append(f"[{key}]")
            tables += [f"{k} = {toml_value(v)}" for k, v in value.items()]
        elif key == "integrated_services":
            for name, svc in value.items():
                tables.append(f"[integrated_services.{name}]")
                tables += [f"{k} = {toml_value(v)}" for k, v in svc.items()]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for entry in value:
                tables.append(f"[[{key}]]")
                tables += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
        else:
            lines.append(f"{key} = {toml_value(value)}")
    path.write_text("\n".join(lines + tables) + "\n")
    return path


@pytest.fixture
def make_settings(tmp_path: Path, namespace: str) -> Callable[..., Settings]:
    """Write a real mailworker.toml in tmp_path and load it: ``make_settings(smtp=[...])``."""

    def make(**data: Any) -> Settings:
        data.setdefault("namespace", namespace)
        data.setdefault("broker_url", REDIS_URL)
        data.setdefault("retry", {"min_backoff": "1s", "max_backoff": "2s"})
        path = write_toml(tmp_path / "mailworker.toml", data)
        return load_settings(path, environ={})

    return make


@pytest.fixture
def run_worker(redis_client: redis.Redis) -> Iterator[Callable[..., Any]]:
    """Build the real app on the test's Redis and run a real Dramatiq Worker in threads."""
    from worker.app import WorkerApp, build

    started: list[tuple[WorkerApp, Worker]] = []

    def run(
        settings: Settings,
        *,
        threads: int = 2,
        client: redis.Redis | None = None,
        **build_options: Any,
    ) -> WorkerApp:
        client = client if client is not None else redis_client
        app = build(settings, client=client, backoff=0.01, **build_options)
        app.broker.emit_after("process_boot")
        worker = Worker(app.broker, worker_timeout=50, worker_threads=threads)
        worker.start()
        started.append((app, worker))
        return app

    yield run
    for app, worker in started:
        worker.stop(timeout=5000)
        app.close()


@pytest.fixture(autouse=True)
def _no_event_loop_leak() -> Iterator[None]:
    yield
    asyncio.set_event_loop(None)
