"""Single enqueues of concurrent requests, sent to Redis together.

Each ``POST /v1/notifications`` waits for its job id while a single task sends the
jobs that are waiting in one pipeline of the Producer's enqueue script (one broker
message and one script call per job, as ``Producer.enqueue`` sends it), in a thread so
the event loop goes on reading requests meanwhile. A lone request goes out at once;
under load, those that arrive while a pipeline is in flight go in the next one. A job
with an idempotency key goes alone, so a conflict is its own answer.
"""

from __future__ import annotations

import asyncio
from typing import Any

from anyio import to_thread

from producers import Notification, Producer
from settings import JobValidationError

__all__ = ["Enqueuer"]

_MOST = 100  # jobs in one pipeline


class Enqueuer:
    """Enqueues notifications for the handlers of one event loop.

    Args:
        producer: the API's producer.
    """

    def __init__(self, producer: Producer) -> None:
        self._producer = producer
        self._waiting: list[tuple[Notification, asyncio.Future[str]]] = []
        self._running = False

    async def enqueue(self, job: Notification) -> str:
        """The job's id once it is on the queue (``Producer.enqueue``'s errors)."""
        if job.idempotency_key is not None:
            return await to_thread.run_sync(self._producer.enqueue, job)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting.append((job, future))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                group, self._waiting = self._waiting[:_MOST], self._waiting[_MOST:]
                await self._send(group)
        finally:
            self._running = False

    async def _send(
        self, group: list[tuple[Notification, asyncio.Future[str]]]
    ) -> None:
        jobs = [job for job, _ in group]
        try:
            ids = await to_thread.run_sync(self._one_by_one, jobs)
        except JobValidationError as exc:
            if len(group) == 1:
                raise_in(group, exc)
                return
            for job, future in group:  # one became invalid since it was checked
                await self._send([(job, future)])
            return
        except Exception as exc:  # each request answers with what the broker did
            raise_in(group, exc)
            return
        for (_, future), job_id in zip(group, ids, strict=True):
            if not future.done():
                future.set_result(job_id)

    def _one_by_one(self, jobs: list[Notification]) -> list[str]:
        """One broker message per job, all in one pipeline (a lone one: one call)."""
        if len(jobs) == 1:
            return [self._producer.enqueue(jobs[0])]
        return self._producer.enqueue_many(jobs, bulk=False)


def raise_in(group: list[tuple[Notification, asyncio.Future[str]]], exc: Any) -> None:
    """Fail every request of ``group`` with ``exc``."""
    for _, future in group:
        if not future.done():
            future.set_exception(exc)
