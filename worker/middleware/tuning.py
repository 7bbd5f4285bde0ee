"""Worker settings Dramatiq reads too early: the idle poll, delayed prefetch, malloc."""

from __future__ import annotations

import ctypes
import os

from dramatiq import Broker, Middleware, Worker

__all__ = [
    "DELAY_PREFETCH",
    "MMAP_THRESHOLD",
    "POLL_ENV",
    "WorkerTuning",
    "fix_mmap_threshold",
]


# Dramatiq's own environment variable for the idle poll (ms). Lower case is its spelling.
POLL_ENV = "dramatiq_worker_timeout"

# Delayed messages (retries waiting for their time) a worker process holds in memory per
# thread. Dramatiq's default, 1,000 per thread, lets a backlog of retries grow a process
# by hundreds of MB. The rest wait in Redis.
DELAY_PREFETCH = 25


# glibc's M_MMAP_THRESHOLD, and the value a worker process keeps fixed (glibc's default).
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024


def fix_mmap_threshold() -> bool:
    """Keep glibc's malloc from raising its mmap threshold.

    glibc raises it (up to 32 MiB) after the first large block is freed. With it fixed,
    every block over 128 KiB (a large message's payload, its decoded attachment, the
    temporary copies on the way) is mapped on its own and returned to the system when
    freed, instead of staying in a heap arena. ``python -m bench.memory`` measures the
    effect (docs/benchmarks.md). A no-op where there is no glibc ``mallopt``.

    Returns:
        True when the threshold was set.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


class WorkerTuning(Middleware):
    """Tunes a worker before it starts its consumers.

    It sets the idle poll: ``poll_interval`` ms, else ``dramatiq_worker_timeout`` from
    the environment, as ``mailworker worker`` sets it. It caps the delayed messages a
    worker prefetches (``DELAY_PREFETCH`` per thread). It fixes malloc's mmap threshold
    (``fix_mmap_threshold``).

    Dramatiq reads both from the environment once, when it is imported, which is too
    early for a command that imported it before it parsed its own options.
    """

    def __init__(self, poll_interval: int | None = None) -> None:
        self.poll_interval = poll_interval

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        poll = self.poll_interval or int(os.environ.get(POLL_ENV) or 0)
        if poll > 0:
            worker.worker_timeout = poll
        worker.delay_prefetch = min(
            worker.delay_prefetch, DELAY_PREFETCH * max(1, worker.worker_threads)
        )
        fix_mmap_threshold()
