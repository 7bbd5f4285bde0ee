"""Single jobs before bulk inside a worker process: a thread kept free for them, and the
interpreter lock theirs once they run.

Dramatiq gives a free thread a single job before a bulk message (``deliver_batch`` has
the lower priority), but a bulk message of 20 jobs keeps its thread for tens of
milliseconds, and with every thread on one a single job waits for the first to finish.
While single jobs come in (one started in the last ``KEEP_FREE_FOR`` seconds),
``BulkSlots`` lets at most ``threads - 1`` bulk messages into a process' threads (the
consumer keeps the rest back, and goes on handing over single jobs), so one thread is
free or running a single job; a bulk send alone has every thread.

Once it runs, a single job shares the process' one interpreter lock with every thread
busy on a bulk message, and its ~1.5 ms of work is stretched to tens of milliseconds. So
a bulk message pauses before each of its messages while any single job of the same
process runs, for at most ``PAUSE_LIMIT`` seconds in all per bulk message: single jobs
go first, and a steady stream of them slows a bulk send without stopping it. (The pause
can hold an SMTP session: with ``max_connections`` below ``--threads``, a single job
waiting for a session waits at most that long more.)

Measured with the benchmark's priority phase (high-priority jobs at 20/s while bulk jobs
drain). The pause, two alternating pairs on a slow sitting with 20,000 bulk jobs: the high
jobs' p50 46 against 54-56 ms, p95 92-98 against 104-105 ms. The free thread, two
alternating pairs with 150,000 bulk jobs (a 13-18 s drain), high jobs enqueued during the
drain: p50 13.3-14.8 against 16.9-19.8 ms, p99 34.8-39.0 against 47.5-54.4 ms, the drain
as fast (8,480 and 9,764 against 8,256 and 9,470 msg/s).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from dramatiq import Broker, Middleware, Worker
from dramatiq.broker import MessageProxy

from common.keys import BATCH_ACTOR_NAME

__all__ = ["PAUSE_LIMIT", "BulkSlots", "Express"]

# The longest a bulk message waits in all, before its messages, for single jobs to finish.
PAUSE_LIMIT = 0.25

# For this long after a single job started, a thread of the process is kept free of bulk
# messages. (Always keeping one free cost a bulk send up to a tenth of its speed in some
# runs: 20,000-job drains, -p 2 -t 8.)
KEEP_FREE_FOR = 10.0


class Express:
    """Counts the single jobs running in this process; bulk sends wait while any does.

    Args:
        limit: the longest a bulk message waits in all, in seconds.
    """

    def __init__(self, limit: float = PAUSE_LIMIT) -> None:
        self.limit = limit
        # time.monotonic() when a single job last began
        self.last_started = -float("inf")
        self._running = 0
        self._idle = threading.Condition()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """A single job runs inside this block."""
        with self._idle:
            self._running += 1
            self.last_started = time.monotonic()
        try:
            yield
        finally:
            with self._idle:
                self._running -= 1
                if not self._running:
                    self._idle.notify_all()

    def wait(self, limit: float) -> float:
        """Return when no single job runs, or after ``limit`` seconds; the seconds waited."""
        if not self._running or limit <= 0:  # the common case: no lock, no clock
            return 0.0
        began = time.monotonic()
        with self._idle:
            self._idle.wait_for(lambda: not self._running, timeout=limit)
        return time.monotonic() - began


class BulkSlots(Middleware):
    """How many bulk messages this process' worker threads may hold: while single jobs
    come in (``express``: one started in the last ``keep_free_for`` seconds), one fewer
    than it has threads (at least one), so that a single job does not wait for a bulk
    message to finish; otherwise all of them. The consumers ask ``take`` before handing
    a bulk message over; a message frees its slot when a thread is done with it
    (processed, failed or skipped).

    Args:
        express: the process' single jobs (``Express``), whose last start is read.
        keep_free_for: seconds after a single job started that a thread is kept free.
    """

    def __init__(self, express: Express, keep_free_for: float = KEEP_FREE_FOR) -> None:
        self.threads = 0  # no limit until the worker boots and its threads are known
        self._express = express
        self._keep_free_for = keep_free_for
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self._wakes: list[Callable[[], None]] = []

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        self.threads = worker.worker_threads
        with self._lock:
            self._running.clear()

    @property
    def limit(self) -> int:
        """Bulk messages the threads may hold now (0: no limit)."""
        threads = self.threads
        if threads > 1 and (
            time.monotonic() - self._express.last_started < self._keep_free_for
        ):
            return threads - 1
        return threads

    def take(self, message: MessageProxy) -> bool:
        """Claim a slot for a bulk message about to be handed to the threads; False
        when every slot is taken. Any other message needs none, nor does one with an
        ``eta``: Dramatiq holds it back until then and puts it on its queue again."""
        if message.actor_name != BATCH_ACTOR_NAME or "eta" in message.options:
            return True
        with self._lock:
            limit = self.limit
            if limit and len(self._running) >= limit:
                return False
            self._running.add(_key(message))
            return True

    def room(self) -> bool:
        """Whether a bulk message would get a slot now."""
        limit = self.limit
        return not limit or len(self._running) < limit

    def on_free(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` whenever a slot frees (a consumer with bulk messages kept back)."""
        with self._lock:
            if wake not in self._wakes:
                self._wakes.append(wake)

    def off_free(self, wake: Callable[[], None]) -> None:
        """Stop calling ``wake`` (its consumer closed)."""
        with self._lock:
            if wake in self._wakes:
                self._wakes.remove(wake)

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        self._free(message)

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        self._free(message)

    def _free(self, message: MessageProxy) -> None:
        if message.actor_name != BATCH_ACTOR_NAME:
            return  # took no slot (the common case: no lock)
        with self._lock:
            key = _key(message)
            if key not in self._running:
                return
            self._running.discard(key)
            wakes = list(self._wakes)
        for wake in wakes:
            wake()


def _key(message: MessageProxy) -> str:
    return str(message.options.get("redis_message_id") or message.message_id)
