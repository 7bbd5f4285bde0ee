"""Releases due scheduled jobs onto their queues, from every worker process."""

from __future__ import annotations

import random
import threading
from typing import Any

import structlog
from dramatiq import Broker, Middleware, Worker

__all__ = ["RELEASE_INTERVAL", "Releaser"]

log = structlog.get_logger("mailworker.schedule")

# Seconds between two looks at the scheduled set (one ZRANGEBYSCORE each when nothing
# is due), a fifth more or less at random so that processes do not look in step.
RELEASE_INTERVAL = 0.25


class Releaser(Middleware):
    """A thread in each worker process that moves due scheduled jobs onto their queues.

    Whichever process looks first releases an entry (``Schedule.release``); the
    others find it gone. Nothing is held in memory between a look and the release: a
    process that dies between them leaves the entries where they were. The release
    script wakes the idle consumers of the queues it filled.

    Args:
        interval: seconds between looks.
    """

    def __init__(self, interval: float = RELEASE_INTERVAL) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.released = 0

    def after_worker_boot(self, broker: Broker, worker: Worker) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(broker,), name="mailworker-release", daemon=True
        )
        self._thread.start()

    def before_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        # What is due now waits in Redis for another process, or this one's restart.
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def release(self, broker: Any) -> int:
        """One look: release what is due now; return how many this process released."""
        count: int = broker.schedule.release_due()
        if count:
            self.released += count
            waker = getattr(broker, "waker", None)
            if waker is not None:
                waker.wake()  # this process' consumers, before the published wake-up
            log.info("scheduled_released", count=count)
        return count

    def _run(self, broker: Broker) -> None:
        failing = False
        while not self._stop.wait(self.interval * random.uniform(0.8, 1.2)):
            try:
                self.release(broker)
            except Exception as exc:  # Redis away: the entries wait; try again later
                if not failing:
                    log.warning(
                        "scheduled_release_failed", error_type=type(exc).__name__
                    )
                failing = True
                continue
            failing = False
