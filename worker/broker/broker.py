"""The broker: Dramatiq's ``RedisBroker`` with our consumer and faster signals."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from dramatiq import Middleware
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker
from dramatiq.message import Message
from dramatiq.middleware import MiddlewareError

from worker.broker.consumer import SafeConsumer
from worker.broker.schedule import Schedule
from worker.broker.scripts import DispatchScript, ThreadLocalScript

if TYPE_CHECKING:
    from worker.deadletter import DeadLetters
    from worker.middleware.bulk_slots import BulkSlots
    from worker.middleware.wake import Waker
    from worker.status import StatusStore

__all__ = ["MailBroker"]


class MailBroker(RedisBroker):
    """``RedisBroker`` with the safe consumer, our status records and dead letters.

    A message enqueued with a delay longer than ``SCHEDULE_AFTER_MS`` waits in the
    scheduled set in Redis (``schedule``), not as a delayed message a worker holds.

    Args:
        status: where the consumer writes job records (with each ack).
        dead_letters: where the consumer keeps poison messages.
        waker: wakes idle consumers when a producer enqueues (also a middleware).
        stopping: set when the worker stops: consumers fetch no more.
        bulk_slots: how many bulk messages the threads may hold (also a middleware).
        kwargs: Dramatiq's ``RedisBroker`` options.
    """

    def __init__(
        self,
        *,
        status: StatusStore,
        dead_letters: DeadLetters,
        waker: Waker | None = None,
        stopping: threading.Event | None = None,
        bulk_slots: BulkSlots | None = None,
        **kwargs: Any,
    ) -> None:
        # add_middleware (called by __init__) resets it
        self._hooks: dict[str, list[Any]] = {}
        # Dramatiq's, untyped
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        # Fetches (idle queues are polled too), enqueues and acks run Dramatiq's dispatch
        # script: over each thread's own connection, as our status writes do. Fetches and
        # enqueues are not idempotent: a lost reply is raised, never retried.
        source = self.scripts["dispatch"].script
        assert isinstance(source, str | bytes)
        self.scripts["dispatch"] = DispatchScript(
            ThreadLocalScript(self.client, source, idempotent=False)
        )
        self.status = status
        self.dead_letters = dead_letters
        self.waker = waker
        self.stopping = stopping or threading.Event()
        self.bulk_slots = bulk_slots
        self.schedule = Schedule(self.client, self.namespace)
        self._handed: dict[str, list[MessageProxy]] = {}
        self._handed_lock = threading.Lock()
        # The redis message ids this process fetched and has not acknowledged or put
        # back, by queue (each queue has one consumer thread), and the queues whose
        # last fetch lost its reply (SafeConsumer).
        self.held: dict[str, set[str]] = {}
        self.fetch_lost: set[str] = set()

    @property
    def consumer_class(self) -> type[SafeConsumer]:
        return SafeConsumer

    def enqueue(
        self, message: Message[Any], *, delay: int | None = None
    ) -> Message[Any]:
        """Dramatiq's enqueue, but a long delay waits in the scheduled set."""
        if not self.schedule.takes(delay):
            return super().enqueue(message, delay=delay)
        assert delay is not None
        scheduled, due_ms = self.schedule.entry(
            message, int(time.time() * 1000) + delay
        )
        self.emit_before("enqueue", scheduled, delay)
        self.schedule.add([(scheduled, due_ms)])
        self.emit_after("enqueue", scheduled, delay)
        return scheduled

    def hand_over(self, queue: str, messages: list[MessageProxy]) -> None:
        """Keep messages a closing consumer could not put back for the queue's next one.

        They stay this process' own in Redis: nobody else would take them.
        """
        with self._handed_lock:
            self._handed.setdefault(queue, []).extend(messages)

    def handed_over(self, queue: str) -> list[MessageProxy]:
        """Take what ``hand_over`` kept for ``queue``."""
        with self._handed_lock:
            return self._handed.pop(queue, [])

    def add_middleware(self, middleware: Middleware, **kwargs: Any) -> None:
        super().add_middleware(middleware, **kwargs)
        self._hooks = {}

    def _hooks_for(self, name: str) -> list[Any]:
        """The middleware methods that implement hook ``name``, in middleware order.

        Dramatiq calls every middleware's method for every signal, the base class's
        no-ops included (about ten per message per signal here). This skips those.
        """
        hooks = self._hooks.get(name)
        if hooks is None:
            base = getattr(Middleware, name, None)
            hooks = [
                getattr(m, name)
                for m in self.middleware
                if getattr(type(m), name, None) is not base
            ]
            self._hooks[name] = hooks
        return hooks

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        name = "before_" + signal
        self._emit(name, self._hooks_for(name), args, kwargs, reraise=True)

    def emit_after(self, signal: str, *args: Any, **kwargs: Any) -> None:
        name = "after_" + signal
        self._emit(name, reversed(self._hooks_for(name)), args, kwargs, reraise=False)

    def _emit(
        self,
        name: str,
        hooks: Iterable[Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        reraise: bool,
    ) -> None:
        """Dramatiq's semantics: a failing hook is logged and the others still run.

        Only a ``MiddlewareError`` from a ``before_`` hook stops the signal.
        """
        for hook in hooks:
            try:
                hook(self, *args, **kwargs)
            except MiddlewareError:
                if reraise:
                    raise
                self._hook_failed(name, hook)
            except Exception:
                self._hook_failed(name, hook)

    def _hook_failed(self, name: str, hook: Any) -> None:
        self.logger.critical(
            "Unexpected failure in %s of %r.", name, hook.__self__, exc_info=True
        )
