"""Timeouts kept by the kernel (``common.sockets``): plain-TCP SMTP and Redis sockets
are blocking, with SO_RCVTIMEO/SO_SNDTIMEO, and a stalled peer still fails the call."""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from common.broker import connect
from common.sockets import KernelTimeoutConnection, supported
from worker.errors import TransientDeliveryError
from worker.transports.smtp_client import SmtpClient

pytestmark = pytest.mark.skipif(not supported(), reason="Linux only")


class Silent:
    """A TCP server that greets with ``greeting`` lines (one per line it reads) and then
    reads whatever comes without ever answering, until the test ends."""

    def __init__(self, greeting: list[bytes]) -> None:
        self.greeting = greeting
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.done = threading.Event()
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(0.2)
            replies = list(self.greeting)
            if replies:
                conn.sendall(replies.pop(0))  # the banner comes unasked
            while not self.done.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    return
                self.received += chunk
                if replies:
                    conn.sendall(replies.pop(0))

    def close(self) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        self.listener.close()


@pytest.fixture
def silent() -> Iterator[Any]:
    servers: list[Silent] = []

    def make(*greeting: bytes) -> Silent:
        servers.append(Silent(list(greeting)))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def _outcome(call: Any, bound: float = 20.0) -> BaseException | None:
    """Run ``call`` in a thread; its exception, or None. A call still blocked after
    ``bound`` seconds fails the test (the timeout did not work)."""
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            result.append(None)
        except BaseException as exc:  # handed to the test
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(bound)
    assert result, f"still blocked after {bound} s: the socket timeout was not applied"
    return result[0]


def test_a_plain_smtp_session_is_blocking_and_a_stall_times_out(silent, make_settings):
    server = silent(b"220 stub ESMTP\r\n", b"250-stub\r\n250 PIPELINING\r\n")
    conn = make_settings(
        smtp=[
            {
                "name": "stall",
                "from_address": "noreply@example.com",
                "server": "127.0.0.1",
                "port": server.port,
                "security": "none",
                "timeout": "1s",
            }
        ]
    ).smtp[0]
    client = SmtpClient(conn, None)
    client.open()
    try:
        sock = client._smtp.sock  # type: ignore[union-attr]
        assert sock.gettimeout() is None  # no poll before each send and receive
        error = _outcome(
            lambda: client.send("noreply@example.com", ("a@example.org",), b"Hi\r\n")
        )
    finally:
        client.close()
    assert isinstance(error, TransientDeliveryError)
    assert "timed out during send" in str(error)
    assert b"MAIL FROM:<noreply@example.com>" in server.received


def test_a_stalled_redis_fails_the_call(silent):
    server = silent()
    pool = redis.ConnectionPool(
        connection_class=KernelTimeoutConnection,
        host="127.0.0.1",
        port=server.port,
        io_timeout=0.5,
        socket_connect_timeout=2,
    )
    client = redis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
    try:
        error = _outcome(lambda: client.execute_command("PING"))
    finally:
        client.close()
    assert isinstance(error, redis.ConnectionError)
    assert "reading from socket" in str(error)
    assert server.received  # it asked, and got no answer


def test_pooled_connections_stay_blocking_after_the_pool_peeks_at_them(redis_url):
    """The pool checks a connection for unread data when it is taken (a non-blocking
    read); the socket must come back blocking, not with a Python timeout."""
    client = connect(redis_url)
    try:
        assert client.connection_pool.connection_class is KernelTimeoutConnection
        for _ in range(3):
            assert client.ping()
        conn = client.connection_pool.get_connection()
        try:
            assert conn._sock.gettimeout() is None
            level, option = socket.SOL_SOCKET, socket.SO_RCVTIMEO
            assert conn._sock.getsockopt(level, option, 16) != bytes(16)
        finally:
            client.connection_pool.release(conn)
    finally:
        client.close()


def test_tls_and_other_platforms_keep_python_timeouts(monkeypatch):
    from common import sockets

    assert "rediss" not in str(connect("rediss://127.0.0.1:1").connection_pool)
    assert connect("rediss://127.0.0.1:1").connection_pool.connection_class is not (
        KernelTimeoutConnection
    )
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not sockets.supported()
    plain = connect("redis://127.0.0.1:1")
    assert plain.connection_pool.connection_class is redis.Connection
    assert plain.connection_pool.connection_kwargs["socket_timeout"] == 10


def test_a_plain_smtp_send_that_cannot_write_times_out(make_settings):
    """The server takes the command group, then stops reading the message: the write
    blocks until the kernel's send timeout, and the error says it timed out."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"220 stub ESMTP\r\n")
            conn.recv(4096)  # EHLO
            conn.sendall(b"250-stub\r\n250 PIPELINING\r\n")
            conn.recv(4096)  # MAIL, RCPT, DATA
            conn.sendall(b"250 ok\r\n250 ok\r\n354 go ahead\r\n")
            done.wait(30)  # and read nothing more

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    conn = make_settings(
        smtp=[
            {
                "name": "full",
                "from_address": "noreply@example.com",
                "server": "127.0.0.1",
                "port": listener.getsockname()[1],
                "security": "none",
                "timeout": "1s",
            }
        ]
    ).smtp[0]
    client = SmtpClient(conn, None)
    client.open()
    body = b"x" * 998 + b"\r\n"
    try:
        error = _outcome(
            lambda: client.send(
                "noreply@example.com", ("a@example.org",), body * 32_000
            )
        )
    finally:
        done.set()
        client.close()
        thread.join(timeout=5)
        listener.close()
    assert isinstance(error, TransientDeliveryError)
    assert "timed out during send" in str(error)


def test_the_wake_listener_keeps_python_timeouts(redis_url):
    """redis-py's pub/sub waits on the socket timeout with poll() in places, which
    SO_RCVTIMEO does not bound: the listener's connection keeps Python's timeout."""
    from worker.middleware.wake import _listener_client

    listener = _listener_client(connect(redis_url))
    pool = listener.connection_pool
    try:
        assert pool.connection_class is redis.Connection
        assert pool.connection_kwargs["socket_timeout"] == 10
        assert "io_timeout" not in pool.connection_kwargs
        assert listener.ping()
    finally:
        listener.close()


def test_direct_script_refuses_what_redis_cannot_take(redis_url):
    from worker.broker.scripts import ThreadLocalScript

    script = ThreadLocalScript(connect(redis_url), "return ARGV[1]")
    assert script("fine") == b"fine"
    with pytest.raises(redis.DataError):
        script(None)
