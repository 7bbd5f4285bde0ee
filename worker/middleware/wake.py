"""Wake-ups for idle consumers.

An idle consumer sleeps until a producer says its queue has work, instead of until its
next poll.

Producers publish the queue's name on ``wake_channel`` when they enqueue (at most once
per ``WAKE_GATE_MS`` per queue). In each worker process one thread listens and sets the
queue's event. ``SafeConsumer`` waits on that event where Dramatiq would sleep. Polling
stays as it was: a lost wake-up (the listener reconnecting, a job enqueued by Dramatiq
itself) costs at most one poll interval, never a job.
"""

from __future__ import annotations

import threading
from typing import Any

import redis
import structlog
from dramatiq import Broker, Middleware, Worker

from common.broker import sibling
from common.keys import wake_channel
from common.sockets import KernelTimeoutConnection

__all__ = ["Waker"]

log = structlog.get_logger("mailworker.wake")

_RECONNECT_S = 1.0
CLIENT_NAME = "mailworker-wake"  # how the listener shows in Redis' CLIENT LIST


def _listener_client(client: redis.Redis) -> redis.Redis:
    """A client like ``client`` on a pool of its own (``common.broker.sibling``).

    Its connection is named and pinged every 30 s, so a silently dropped connection is
    found and replaced. Behind Sentinel or on a Cluster it subscribes on the primary
    found when it connects; when that one fails the listener reconnects (after a second)
    to the new one and wakes every queue, so nothing published meanwhile waits longer
    than one poll.
    """
    pool = client.connection_pool
    if pool.connection_class.__module__.startswith("fakeredis"):
        return client  # the embedded broker of `mailworker dev` and the tests
    overrides: dict[str, Any] = {
        "client_name": CLIENT_NAME,
        "health_check_interval": 30,
    }
    if issubclass(pool.connection_class, KernelTimeoutConnection):
        # Python's own timeout here: redis-py's pub/sub waits with poll() on the
        # socket timeout in places, which the kernel's timeouts do not bound.
        overrides["connection_class"] = redis.Connection
        overrides["socket_timeout"] = pool.connection_kwargs["io_timeout"]
        return sibling(client, without=("io_timeout",), max_connections=2, **overrides)
    return sibling(client, max_connections=2, **overrides)


class Waker(Middleware):
    """Listens for wake-ups in each worker process and hands them to the consumers.

    Args:
        client: Redis (the broker's). The listener uses a connection of its own.
        namespace: the key namespace.
    """

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self._client = _listener_client(client)
        self._own_client = self._client is not client
        self._channel = wake_channel(namespace)
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.wakeups = 0

    def event(self, queue: str) -> threading.Event:
        """The event set when ``queue`` (a Dramatiq queue name) is woken."""
        with self._lock:
            return self._events.setdefault(queue, threading.Event())

    def wake(self, queue: str | None = None) -> None:
        """Wake the consumers of ``queue``, or of every queue."""
        with self._lock:
            if queue is None:
                events = list(self._events.values())
            else:
                events = [e] if (e := self._events.get(queue)) is not None else []
        for event in events:
            event.set()

    def after_worker_boot(self, broker: Broker, worker: Worker) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._listen, name="mailworker-wake", daemon=True
        )
        self._thread.start()

    def before_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._own_client:
            self._client.close()

    def _listen(self) -> None:
        failures = 0
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self._channel)
                # A wake-up published while we were not listening is not lost work, but
                # its jobs would wait for the next poll: look now.
                self.wake()
                failures = 0
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message and message.get("type") == "message":
                        data = message["data"]
                        self.wakeups += 1
                        self.wake(data.decode() if isinstance(data, bytes) else data)
            except (redis.RedisError, OSError, ValueError) as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        "wake_listener_lost",
                        error=type(exc).__name__,
                        note="idle queues are polled until it is back",
                    )
                self._stop.wait(_RECONNECT_S)
            finally:
                pubsub.close()
