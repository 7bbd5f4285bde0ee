"""Bulk messages (``enqueue_many``): many jobs in one broker message, single jobs first.

Dramatiq gives a free thread a single job before a bulk message (``deliver_batch`` has
the lower priority), but a bulk message of 20 jobs keeps its thread for tens of
milliseconds. While single jobs come in, ``BulkSlots`` (``worker.middleware``) keeps
one thread free of bulk messages.

Once it runs, a single job shares the process' one interpreter lock with every thread
busy on a bulk message, and its work is stretched many times. So a bulk message pauses
before each of its messages while any single job of the same process runs, for at most
``PAUSE_LIMIT`` seconds in all per bulk message. Single jobs go first, and a steady
stream of them slows a bulk send without stopping it. The pause can hold an SMTP
session: with ``max_connections`` below ``--threads``, a single job waiting for a
session waits at most that long more. docs/benchmarks.md has the measurements.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import dramatiq
import structlog
from dramatiq.middleware import CurrentMessage

from settings import JobValidationError
from worker.attempt import Job
from worker.broker.envelope import JOB_ID_RULE, is_job_id
from worker.delivery import Deliverer, Outcome
from worker.logging import lines_together
from worker.status import StatusStore

if TYPE_CHECKING:
    from worker.actors import JobHandler, Prepared

__all__ = ["BULK_TIME_LIMIT", "PAUSE_LIMIT", "BulkHandler", "SingleJobs"]

log = structlog.get_logger("mailworker.job")

# The longest a bulk message waits in all, before its messages, for single jobs to finish.
PAUSE_LIMIT = 0.25

# A bulk message that has run this long sends no more of its jobs: the rest go back to
# the queue as single jobs. There is no other time limit: each step of a send is bounded
# by its service's timeout, and cutting a send off (Dramatiq's TimeLimit raises into the
# thread wherever it is) would leave its outcome unknown.
BULK_TIME_LIMIT = 600.0


class SingleJobs:
    """Counts the single jobs running in this process.

    Bulk sends wait while any does.

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
        """Return the seconds waited, once no single job runs or after ``limit`` seconds."""
        if not self._running or limit <= 0:  # the common case: no lock, no clock
            return 0.0
        began = time.monotonic()
        with self._idle:
            self._idle.wait_for(lambda: not self._running, timeout=limit)
        return time.monotonic() - began


class BulkHandler:
    """Runs one bulk message: the ``deliver_batch`` actor.

    Args:
        jobs: runs each job's attempt (validation, records, retries).
        status: the status store.
        deliverer: the services in delivery order.
        draining: set when the worker stops: a bulk message hands its rest back.
        single_jobs: the single jobs running in this process, which bulk messages
            wait for.
        time_limit: seconds a bulk message without a ``time_limit`` option may run
            before the jobs it has not begun go back to the queue.
    """

    def __init__(
        self,
        jobs: JobHandler,
        *,
        status: StatusStore,
        deliverer: Deliverer,
        draining: threading.Event,
        single_jobs: SingleJobs,
        time_limit: float = BULK_TIME_LIMIT,
    ) -> None:
        self._jobs = jobs
        self._status = status
        self._deliverer = deliverer
        self._draining = draining
        self._single_jobs = single_jobs
        self._bulk_time_limit = time_limit

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        """The ``deliver_batch`` actor: many jobs in one broker message (``enqueue_many``).

        Each job keeps its own id, status record, marker, retries and dead letter: a job
        to be retried later is put back on the queue as a single job.
        """
        message = CurrentMessage.get_current_message()
        assert message is not None, "the CurrentMessage middleware is required"
        items = kwargs.get("jobs")
        bulk = Job.from_message(message)
        if args or set(kwargs) != {"jobs"} or not isinstance(items, list):
            error = JobValidationError("jobs", "expected a list of jobs")
            self._jobs.invalid(bulk, error)
            return
        jobs = self._with_ids(items, bulk)
        if self._draining.is_set():
            self._hand_back(jobs, bulk)
            return
        ready: list[tuple[Any, Job, Prepared]] = []
        for item in jobs:
            job = bulk.item(item["id"], item.get("job"))
            prepared = self._jobs.prepare(job, item.get("job"))
            if prepared is not None:
                ready.append((item, job, prepared))
        # First tries go out as one pipelined run. It stops early when the worker stops,
        # and before each message it lets the process' running single jobs finish first.
        # What follows (retries, failover, records) is job by job.
        sending = [i for i, (_, _, r) in enumerate(ready) if r.parcel.recipients]
        parcels = [ready[i][2].parcel for i in sending]
        outcomes = dict(
            zip(
                sending,
                self._deliverer.deliver_many(
                    parcels, stop=self._pausing(self._time_limit(message))
                ),
                strict=True,
            )
        )
        unsent = []
        # The jobs' lines are written together (their records too go out together, with
        # the message's ack).
        with lines_together():
            for index, (item, job, r) in enumerate(ready):
                outcome = outcomes.get(index, Outcome())
                if outcome is None:
                    unsent.append(item)
                    continue
                structlog.contextvars.bind_contextvars(job_id=job.id)
                self._jobs.finish(job, r, outcome)
        if unsent:
            self._hand_back(unsent, bulk)

    def _with_ids(self, items: list[Any], bulk: Job) -> list[dict[str, Any]]:
        """The jobs of a bulk message that have a usable id of their own, each once.

        The others can have no record of their own: the bulk message is dead-lettered
        for them (``validation``, the field of the first named), and the rest go on.
        """
        usable: list[dict[str, Any]] = []
        seen: set[str] = set()
        bad: list[tuple[int, bool]] = []  # index, whether its id repeats an earlier one
        for index, item in enumerate(items):
            job_id = item.get("id") if isinstance(item, dict) else None
            if is_job_id(job_id) and job_id not in seen:
                seen.add(job_id)
                usable.append(item)
            else:
                bad.append((index, isinstance(job_id, str) and job_id in seen))
        if bad:
            index, repeated = bad[0]
            problem = (
                "repeats an earlier job's id" if repeated else f"is not {JOB_ID_RULE}"
            )
            error = JobValidationError(
                f"jobs[{index}].id",
                f"{problem} ({len(bad)} of {len(items)} jobs without a usable id; "
                "the others go on)",
            )
            self._jobs.invalid(bulk, error)
        return usable

    def _pausing(self, time_limit: float) -> Callable[[], bool]:
        """For one bulk message, what to call before each of its messages.

        It returns True when the worker stops or the message has run ``time_limit``
        seconds. The jobs not yet sent then go back to the queue, so a message once begun
        is never cut off mid-send. First it waits while single jobs of this process run,
        up to ``SingleJobs.limit`` in all.
        """
        budget = self._single_jobs.limit
        deadline = time.monotonic() + time_limit

        def next_message() -> bool:
            nonlocal budget
            if self._draining.is_set():
                return True
            budget -= self._single_jobs.wait(budget)
            if time.monotonic() >= deadline:
                return True
            return self._draining.is_set()

        return next_message

    def _time_limit(self, message: dramatiq.Message[Any]) -> float:
        """Seconds a bulk message may run.

        That is its ``time_limit`` option (ms) if it has one, else the worker's
        (``BULK_TIME_LIMIT``).
        """
        limit = message.options.get("time_limit")
        return limit / 1000 if limit else self._bulk_time_limit

    def _hand_back(self, items: list[Any], bulk: Job) -> None:
        """Put the jobs not yet started back as single jobs.

        This runs when the worker is stopping or the bulk message ran out of time.
        """
        jobs = [bulk.item(item["id"], item.get("job")) for item in items]
        for job in jobs:
            self._jobs.reschedule(job, 0, count=False)
        for packed in self._status.unbegin_writes([job.ref for job in jobs]):
            self._jobs.record(packed)
        log.info("bulk_handed_back", jobs=len(items))
