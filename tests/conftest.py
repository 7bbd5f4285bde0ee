"""Fixtures for the tests: Redis (the machine's, else fakeredis), aiosmtpd SMTP servers
with trustme certificates and AUTH, a private Dovecot, the Microsoft stand-in, and real
Dramatiq workers."""

from __future__ import annotations

import asyncio
import logging
import ssl
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme
from aiosmtpd.controller import Controller
from dramatiq import Worker

from common.sockets import free_port
from settings import Settings, load_settings
from tests.support.config import write_toml
from tests.support.env import CI, HOST, REDIS_URL
from tests.support.smtp import Recorder, SmtpServer, authenticator

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
            kwargs.update(authenticator=authenticator, auth_required=True)
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


# ---------------------------------------------------------------- Dovecot (IMAP)


@pytest.fixture(scope="session")
def dovecot(ca: trustme.CA) -> Iterator[Any]:
    """A private Dovecot for the session (tests/support/dovecot.py); skips without one."""
    from tests.support.dovecot import Dovecot

    server = Dovecot(ca)
    try:
        server.prepare()
        server.start()
        yield server
    finally:
        server.stop()


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


# ---------------------------------------------------------------- the HTTP API


@pytest.fixture
def api_server(redis_client: redis.Redis) -> Iterator[Callable[..., Any]]:
    """Serve the HTTP API for ``settings`` with uvicorn on a free loopback port."""
    from tests.support.api import ApiServer

    started: list[ApiServer] = []

    def start(settings: Settings) -> ApiServer:
        server = ApiServer(settings, redis_client).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
