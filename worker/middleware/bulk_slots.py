"""How many bulk messages a worker process' threads may hold at once.

While single jobs come in, one thread is kept free of bulk messages, so that a single
job does not wait for a bulk message to finish (``worker.bulk`` has the rest of the
single-before-bulk rule).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dramatiq import Broker, Middleware, Worker
from dramatiq.broker import MessageProxy

from common.keys import BATCH_ACTOR_NAME

if TYPE_CHECKING:
    from worker.bulk import SingleJobs

__all__ = ["KEEP_FREE_FOR", "BulkSlots"]

# For this long after a single job started, a thread of the process is kept free of bulk
# messages. Always keeping one free cost a bulk send up to a tenth of its speed in some
# runs (docs/benchmarks.md).
KEEP_FREE_FOR = 10.0


class BulkSlots(Middleware):
    """How many bulk messages this process' worker threads may hold.

    While single jobs come in (one started in the last ``keep_free_for`` seconds), that
    is one fewer than the threads (at least one), so that a single job does not wait
    for a bulk message to finish. Otherwise it is all of them. The consumers ask
    ``take`` before handing a bulk message over. A message frees its slot when a thread
    is done with it (processed, failed or skipped).

    Args:
        single_jobs: the process' single jobs, whose last start is read.
        keep_free_for: seconds after a single job started that a thread is kept free.
    """

    def __init__(
        self, single_jobs: SingleJobs, keep_free_for: float = KEEP_FREE_FOR
    ) -> None:
        self.threads = 0  # no limit until the worker boots and its threads are known
        self._single_jobs = single_jobs
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
            time.monotonic() - self._single_jobs.last_started < self._keep_free_for
        ):
            return threads - 1
        return threads

    def take(self, message: MessageProxy) -> bool:
        """Claim a slot for a bulk message about to be handed to the threads.

        Returns False when every slot is taken. Any other message needs none, nor does
        one with an ``eta``: Dramatiq holds it back until then and puts it on its queue
        again.
        """
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
