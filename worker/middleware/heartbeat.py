"""Marks this worker process alive and takes back the messages of dead ones."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import structlog
from dramatiq import Broker, Middleware, Worker

from worker.broker.heartbeats import beat, host_key, reap

__all__ = ["Heartbeat"]

log = structlog.get_logger("mailworker.heartbeat")


class Heartbeat(Middleware):
    """Marks this worker process alive and takes back the messages of dead ones.

    Args:
        timeout: seconds without a heartbeat after which a process counts as dead.
        ttl: how long redelivery counts are kept (``status.ttl``).
        host: the name its beats are recorded under (default: ``socket.gethostname()``).
    """

    def __init__(self, *, timeout: float, ttl: float, host: str | None = None) -> None:
        self.timeout = timeout
        self.interval = max(0.2, timeout / 5)
        self._ttl = int(ttl)
        self._host = host
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # monotonic time of the last beat that landed
        self._beat_at: float | None = None
        self._reap_after = 0.0

    @property
    def host(self) -> str:
        """The host name this process's beats are recorded under."""
        return self._host or socket.gethostname()

    def after_worker_boot(self, broker: Broker, worker: Worker) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(broker,), name="mailworker-heartbeat", daemon=True
        )
        self._thread.start()

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        # Not before: while in-flight jobs finish, this process still holds messages
        # (and its consumers, stopping, no longer fetch, which beats too).
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.leave(broker)

    def leave(self, broker: Any) -> None:
        """Take this process out of its host's record: it no longer works there."""
        try:
            broker.client.hdel(host_key(broker.namespace, self.host), broker.broker_id)
        except Exception as exc:  # Redis away: the line is forgotten as it ages
            log.warning("heartbeat_record_not_removed", error_type=type(exc).__name__)

    def beat(self, broker: Any) -> int:
        """One heartbeat and one reaping pass.

        Returns how many messages were taken back.
        """
        client = broker.client
        beat(
            client, broker.namespace, self.host, broker.broker_id, timeout=self.timeout
        )
        at = time.monotonic()
        if self._beat_at is not None and at - self._beat_at > self.timeout:
            # This process could not beat for longer than the timeout (Redis away): nor
            # could any other, so every heartbeat looks stale now. Reap again only once
            # the live ones had a timeout to beat, or their jobs would be sent twice.
            self._reap_after = at + self.timeout
            log.warning("heartbeat_resumed", after_s=round(at - self._beat_at, 1))
        self._beat_at = at
        if at < self._reap_after:
            return 0
        moved = reap(
            client,
            broker.namespace,
            broker.broker_id,
            broker.queues,
            timeout=self.timeout,
            ttl=self._ttl,
        )
        if moved:
            log.warning("messages_redelivered", count=moved, reason="worker_died")
        return moved

    def _run(self, broker: Broker) -> None:
        while not self._stop.is_set():
            try:
                self.beat(broker)
            except Exception as exc:  # Redis away: try again next beat
                log.warning("heartbeat_failed", error_type=type(exc).__name__)
            self._stop.wait(self.interval)
