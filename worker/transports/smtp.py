"""The SMTP transport: pooled sessions per connection, reused across messages."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import redis

from settings import SmtpConnection
from worker.errors import (
    BudgetExhaustedError,
    DeliveryError,
    TransientDeliveryError,
    TransportUnavailableError,
)
from worker.limits import Budget, Slots, Spent
from worker.transports.base import OutgoingMessage, Receipt, SendResult
from worker.transports.smtp_client import SmtpClient

if TYPE_CHECKING:  # msal and requests load only where OpenAuth is configured
    from worker.transports.oauth import TokenProvider

__all__ = ["OUTLOOK_SCOPE", "SmtpTransport", "lease_seconds"]

# SMTP AUTH XOAUTH2 with client credentials needs this resource's scope (Office 365).
OUTLOOK_SCOPE = "https://outlook.office365.com/.default"


def lease_seconds(conn: SmtpConnection) -> float:
    """How long a session's ``max_connections_total`` lease lives without renewal."""
    return max(120.0, 4 * conn.timeout)


# A pooled session idle longer than this is checked with RSET before reuse: servers
# drop idle clients (Postfix after 300 s, Exchange after 10 min).
_CHECK_AFTER_IDLE = 30.0


class SmtpTransport:
    """Sends through one ``[[smtp]]`` connection with up to ``max_connections`` sessions.

    Args:
        conn: the connection's settings.
        tokens: the integrated service account, for ``auth = "xoauth2"``.
        total: ``max_connections_total`` leases shared by every worker, when capped.
        password: a callable returning the current password (re-read after an AUTH failure).
        budget: ``messages_per_minute``, ``messages_per_hour`` and ``recipients_per_day``
            across every worker (None: none, as for ``test-connection``).
    """

    needs_mime = True

    def __init__(
        self,
        conn: SmtpConnection,
        *,
        password: Callable[[], str | None],
        tokens: TokenProvider | None = None,
        total: Slots | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.name = conn.name
        self._budget = budget if budget is not None and not budget.unlimited else None
        self.conn = conn
        self._password = password
        self._tokens = tokens
        self._total = total
        self._lease_seconds = lease_seconds(conn)
        self._slots = threading.BoundedSemaphore(conn.max_connections)
        self._idle: list[tuple[float, SmtpClient]] = []
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"SmtpTransport({self.name!r}, {self.conn.server}:{self.conn.effective_port})"

    def send(self, message: OutgoingMessage) -> Receipt:
        """Send one message on a pooled session.

        Raises:
            BudgetExhaustedError: a sending budget is spent (nothing was sent).
            TransportUnavailableError: connect, TLS or AUTH failed, or a quota reply.
            TransientDeliveryError: 4xx, timeout, lost connection, no free session in
                time, or the budget's Redis did not answer. ``in_doubt`` when the reply
                to the final dot was lost.
            MessageRefusedError: the sender or message was refused for good.
        """
        return self._send_held(message, spend=True)

    def _send_held(self, message: OutgoingMessage, *, spend: bool) -> Receipt:
        """``send`` on a session of this process; ``spend`` unless already spent."""
        if not self._slots.acquire(timeout=self.conn.timeout):
            raise TransientDeliveryError(
                f"all {self.conn.max_connections} sessions busy for {self.conn.timeout:g}s",
                service=self.name,
            )
        try:
            if spend and self._budget is not None:
                spent = self._spend([message])
                if spent.count == 0:
                    raise self._spent(spent)
            return self._send(message)
        finally:
            self._slots.release()

    def _spend(self, messages: Sequence[OutgoingMessage]) -> Spent:
        """Spend the budget of the first messages that fit.

        Raises:
            TransientDeliveryError: the budget's Redis did not answer.
        """
        assert self._budget is not None
        try:
            spent = self._budget.spend_many([len(m.recipients) for m in messages])
        except redis.RedisError as exc:  # a passing failure of this send, never a crash
            raise TransientDeliveryError(
                "cannot spend the sending budget: the broker's Redis answered "
                f"{type(exc).__name__}",
                service=self.name,
            ) from exc
        return spent

    def _pay(
        self, messages: Sequence[OutgoingMessage], results: list[SendResult]
    ) -> int:
        """Spend the budget of as many messages as fit, from the first; how many.

        When a per-message budget stopped them, no later one fits either, whatever its
        recipients: those are refused in ``results`` at once (the others go on to
        ``send``, which asks again for each).
        """
        if self._budget is None:
            return len(messages)
        try:
            spent = self._spend(messages)
        except TransientDeliveryError:
            return 0  # each message finds out on its own
        if spent.limit.startswith("messages_"):
            for index in range(spent.count, len(messages)):
                results[index] = self._spent(spent)
        return spent.count

    def _spent(self, spent: Spent) -> BudgetExhaustedError:
        return BudgetExhaustedError.spent(
            spent.limit,
            f"[[smtp]] {self.name}",
            spent.wait,
            service=self.name,
            overflow=self.conn.overflow,
        )

    def send_many(
        self,
        messages: Sequence[OutgoingMessage],
        *,
        stop: Callable[[], bool] | None = None,
    ) -> list[SendResult]:
        """Send many messages on one pooled session, pipelined across messages.

        This is ``SmtpClient.send_many``, for as many messages, from the first, as the
        budget has room for. The others, and those the session could not take, are sent
        one by one as ``send`` does.

        Returns:
            Per message, its Receipt, the DeliveryError ``send`` would have raised, or
            None when ``stop`` became true before it was sent.
        """
        results: list[SendResult] = [None] * len(messages)
        paid = 0  # the first ``paid`` messages have spent the budget
        if self._slots.acquire(timeout=self.conn.timeout):
            try:
                paid = self._pay(messages, results)
                if paid:
                    client, _ = self._checkout()
                    try:
                        results[:paid] = client.send_many(
                            [(m.sender, m.recipients, m.data) for m in messages[:paid]],
                            stop=stop,
                        )
                    finally:
                        self._checkin(client)
            except DeliveryError:
                pass  # connecting failed: each message finds out on its own below
            finally:
                self._slots.release()
        out: list[SendResult] = []
        for index, (message, result) in enumerate(zip(messages, results, strict=True)):
            if result is None and not (stop and stop()):
                try:
                    result = self._send_held(message, spend=index >= paid)
                except DeliveryError as exc:
                    result = exc
            out.append(result)
        return out

    def _send(self, message: OutgoingMessage) -> Receipt:
        client, reused = self._checkout()
        try:
            receipt = client.send(message.sender, message.recipients, message.data)
        except TransientDeliveryError as exc:
            client.close()
            if not reused or exc.in_doubt:
                raise
            # A pooled session the server dropped while idle: nothing was accepted on it.
            # (Not so once the whole message went out: then the server may have it, and
            # sending it again is a retry the caller records.)
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
        if self._total is not None and now - since > self._lease_seconds / 2:
            client.close()  # its lease may be close to expiry: renew by reconnecting
            return self._connect(), False
        if now - since > _CHECK_AFTER_IDLE:
            try:
                client.reset()
            except DeliveryError:
                client.close()
                return self._connect(), False
        return client, True

    def _connect(self) -> SmtpClient:
        lease = self._lease()
        client = SmtpClient(self.conn, self._password(), oauth_token=self._token)
        if lease is not None and self._total is not None:
            total = self._total
            client.on_close = lambda: total.release(lease)
        try:
            client.open()
        except TransportUnavailableError as exc:
            client.close()
            if exc.code == 535 and self._tokens is not None:
                self._tokens.invalidate()  # the next session asks for a new token
            raise
        except BaseException:
            client.close()
            raise
        return client

    def _lease(self) -> str | None:
        """A lease of ``max_connections_total`` (sessions across all workers), if capped."""
        if self._total is None:
            return None
        try:
            lease = self._total.acquire(self.conn.timeout)
        except redis.RedisError as exc:  # a passing failure of this send, never a crash
            raise TransientDeliveryError(
                "cannot take a max_connections_total lease: the broker's Redis "
                f"answered {type(exc).__name__}",
                service=self.name,
            ) from exc
        if lease is None:
            raise TransientDeliveryError(
                f"all {self._total.limit} sessions across workers are in use "
                "(max_connections_total)",
                service=self.name,
            )
        return lease

    def _token(self) -> str:
        assert self._tokens is not None, "auth = 'xoauth2' needs an integrated service"
        return self._tokens.acquire([OUTLOOK_SCOPE], service=self.name).access_token

    def _checkin(self, client: SmtpClient) -> None:
        if client.broken or self._closed:
            client.close()
            return
        with self._lock:
            self._idle.append((time.monotonic(), client))

    def close(self) -> None:
        """QUIT every idle session. Sessions in use close when returned."""
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        for _, client in idle:
            client.close()
