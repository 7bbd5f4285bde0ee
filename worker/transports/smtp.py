"""The SMTP transport: pooled sessions per connection, reused across messages."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from settings import SmtpConnection
from worker.errors import DeliveryError, TransientDeliveryError
from worker.transports.base import OutgoingMessage, Receipt
from worker.transports.smtp_client import SmtpClient

__all__ = ["SmtpTransport"]

# A pooled session idle longer than this is checked with RSET before reuse: servers
# drop idle clients (Postfix after 300 s, Exchange after 10 min).
_CHECK_AFTER_IDLE = 30.0


class SmtpTransport:
    """Sends through one ``[[smtp]]`` connection with up to ``max_connections`` sessions.

    Args:
        conn: the connection's settings.
        password: a callable returning the current password (re-read after an AUTH failure).
    """

    def __init__(
        self, conn: SmtpConnection, *, password: Callable[[], str | None]
    ) -> None:
        self.name = conn.name
        self.conn = conn
        self._password = password
        self._slots = threading.BoundedSemaphore(conn.max_connections)
        self._idle: list[tuple[float, SmtpClient]] = []
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"SmtpTransport({self.name!r}, {self.conn.server}:{self.conn.effective_port})"

    def send(self, message: OutgoingMessage) -> Receipt:
        """Send one message on a pooled session.

        Raises:
            TransportUnavailableError: connect, TLS or AUTH failed; a quota reply.
            TransientDeliveryError: 4xx, timeout, lost connection, or no free session in time.
            MessageRefusedError: the sender or message was refused for good.
        """
        if not self._slots.acquire(timeout=self.conn.timeout):
            raise TransientDeliveryError(
                f"all {self.conn.max_connections} sessions busy for {self.conn.timeout:g}s",
                service=self.name,
            )
        try:
            return self._send(message)
        finally:
            self._slots.release()

    def _send(self, message: OutgoingMessage) -> Receipt:
        client, reused = self._checkout()
        try:
            receipt = client.send(message.sender, message.recipients, message.data)
        except TransientDeliveryError:
            client.close()
            if not reused:
                raise
            # A pooled session the server dropped while idle: nothing was accepted on it.
            client = self._connect()
            receipt = self._send_fresh(client, message)
        except DeliveryError:
            self._checkin(client)
            raise
        self._checkin(client)
        return receipt

    def _send_fresh(self, client: SmtpClient, message: OutgoingMessage) -> Receipt:
        try:
            return client.send(message.sender, message.recipients, message.data)
        except TransientDeliveryError:
            client.close()
            raise
        except DeliveryError:
            self._checkin(client)
            raise

    def _checkout(self) -> tuple[SmtpClient, bool]:
        now = time.monotonic()
        with self._lock:
            entry = self._idle.pop() if self._idle else None
        if entry is None:
            return self._connect(), False
        since, client = entry
        if now - since > _CHECK_AFTER_IDLE:
            try:
                client.reset()
            except DeliveryError:
                client.close()
                return self._connect(), False
        return client, True

    def _connect(self) -> SmtpClient:
        client = SmtpClient(self.conn, self._password())
        try:
            client.open()
        except BaseException:
            client.close()
            raise
        return client

    def _checkin(self, client: SmtpClient) -> None:
        if client.broken or self._closed:
            client.close()
            return
        with self._lock:
            self._idle.append((time.monotonic(), client))

    def close(self) -> None:
        """QUIT every idle session; sessions in use close when returned."""
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        for _, client in idle:
            client.close()
