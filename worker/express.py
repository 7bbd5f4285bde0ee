"""Single jobs before bulk inside a worker process, also once they are running.

Dramatiq gives a free thread a single job before a bulk message (``deliver_batch`` has
the lower priority), but once it runs, a single job shares the process' one interpreter
lock with every thread busy on a bulk message, and its ~1.5 ms of work is stretched to
tens of milliseconds. So a bulk message pauses before each of its messages while any
single job of the same process runs, for at most ``PAUSE_LIMIT`` seconds in all per bulk
message: single jobs go first, and a steady stream of them slows a bulk send without
stopping it. (The pause can hold an SMTP session: with ``max_connections`` below
``--threads``, a single job waiting for a session waits at most that long more.)

Measured with the benchmark's priority phase (20,000 bulk jobs draining, high-priority
jobs at 20/s; two alternating pairs on a slow sitting): the high jobs' p50 46 against
54-56 ms, p95 92-98 against 104-105 ms; the p99 (145-170 ms) is set by the two cores
being oversubscribed, not by this.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

__all__ = ["PAUSE_LIMIT", "Express"]

# The longest a bulk message waits in all, before its messages, for single jobs to finish.
PAUSE_LIMIT = 0.25


class Express:
    """Counts the single jobs running in this process; bulk sends wait while any does.

    Args:
        limit: the longest a bulk message waits in all, in seconds.
    """

    def __init__(self, limit: float = PAUSE_LIMIT) -> None:
        self.limit = limit
        self._running = 0
        self._idle = threading.Condition()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """A single job runs inside this block."""
        with self._idle:
            self._running += 1
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
